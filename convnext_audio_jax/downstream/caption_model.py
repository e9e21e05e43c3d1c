"""The captioning decoder over a frozen encoder's sequence embeddings (the paper's Sec. 7.1): a word tokenizer
built from the training captions, a standard transformer decoder (post-norm, GELU; the paper's 6 layers, 4 heads,
width 256, dropout 0.2 by default), its teacher-forced loss with label smoothing, and jitted beam search (beam 1
is greedy decoding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from convnext_audio_jax.downstream.caption_metrics import tokenize

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclasses.dataclass
class Tokenizer:
    """Words of the training captions (``tokenize``d) seen at least ``min_count`` times, after the specials."""

    words: list[str]

    @classmethod
    def from_captions(cls, captions: Sequence[str], min_count: int = 1) -> Tokenizer:
        counts = Counter(word for caption in captions for word in tokenize(caption).split())
        return cls([*SPECIALS, *sorted(word for word, count in counts.items() if count >= min_count)])

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.words)}

    def encode(self, caption: str, length: int) -> np.ndarray:
        """(length,) int32: <bos> words <eos> <pad>…, the words cut to fit."""
        ids = [self.index.get(word, UNK) for word in tokenize(caption).split()][: length - 2]
        return np.array([BOS, *ids, EOS] + [PAD] * (length - 2 - len(ids)), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """The words up to the first <eos> (after a leading <bos>), specials left out."""
        words = []
        for i in list(ids)[1 if len(ids) and ids[0] == BOS else 0 :]:
            if i in (EOS, PAD):
                break
            words.append(self.words[i] if i != UNK else "<unk>")
        return " ".join(words)


class DecoderLayer(nn.Module):
    width: int
    heads: int
    feedforward: int
    dropout: float

    @nn.compact
    def __call__(self, x, memory, causal, deterministic: bool):
        drop = functools.partial(nn.Dropout(self.dropout), deterministic=deterministic)
        attend = functools.partial(nn.MultiHeadDotProductAttention, num_heads=self.heads, qkv_features=self.width,
                                   dropout_rate=self.dropout, deterministic=deterministic)
        x = nn.LayerNorm()(x + drop(attend(name="self_attention")(x, x, mask=causal)))
        x = nn.LayerNorm()(x + drop(attend(name="cross_attention")(x, memory)))
        hidden = drop(nn.gelu(nn.Dense(self.feedforward)(x), approximate=False))
        return nn.LayerNorm()(x + drop(nn.Dense(self.width)(hidden)))


class CaptionDecoder(nn.Module):
    """(B, T, C) audio sequence and (B, L) token ids → (B, L, vocab) next-token logits."""

    vocab_size: int
    max_length: int = 30
    width: int = 256
    layers: int = 6
    heads: int = 4
    feedforward: int = 2048
    dropout: float = 0.2

    @nn.compact
    def __call__(self, audio, tokens, deterministic: bool = True):
        memory = nn.Dense(self.width, name="audio_projection")(audio)
        positions = self.param("positions", nn.initializers.normal(0.02), (self.max_length, self.width))
        x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens) + positions[: tokens.shape[1]]
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        causal = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            x = DecoderLayer(self.width, self.heads, self.feedforward, self.dropout, name=f"layer_{i}")(
                x, memory, causal, deterministic)
        return nn.Dense(self.vocab_size, name="classifier")(x)


def caption_loss(logits: jax.Array, tokens: jax.Array, smoothing: float) -> jax.Array:
    """Teacher forcing: ``logits`` (B, L-1, V) from ``tokens[:, :-1]`` predict ``tokens[:, 1:]``; cross-entropy with
    label smoothing, averaged over the non-padding targets."""
    targets = tokens[:, 1:]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    mask = (targets != PAD).astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@functools.partial(jax.jit, static_argnames=("model", "beam", "length"))
def beam_search(model: CaptionDecoder, params, audio: jax.Array, beam: int, length: int) -> tuple[jax.Array, jax.Array]:
    """(B, length) best token ids (<bos> first) and (B,) their log-probabilities: beam search without a length
    normalisation over the words and <eos> (<pad> and <bos> are never emitted); a beam that has emitted <eos>
    keeps its score and pads. ``beam=1`` is greedy decoding."""
    batch = audio.shape[0]
    memory = jnp.repeat(audio, beam, axis=0)
    tokens = jnp.full((batch, beam, length), PAD, jnp.int32).at[:, :, 0].set(BOS)
    scores = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None, :].repeat(batch, axis=0)
    finished = jnp.zeros((batch, beam), bool)

    def step(t, carry):
        tokens, scores, finished = carry
        logits = model.apply({"params": params}, memory, tokens.reshape(batch * beam, length))
        logp = jax.nn.log_softmax(logits[:, t - 1].astype(jnp.float32)).reshape(batch, beam, -1)
        vocab = logp.shape[-1]
        keep = jnp.where(jnp.arange(vocab) == PAD, 0.0, -jnp.inf)  # a finished beam only pads, at no cost
        never = (jnp.arange(vocab) == PAD) | (jnp.arange(vocab) == BOS)  # an unfinished one never emits these
        logp = jnp.where(finished[:, :, None], keep, jnp.where(never, -jnp.inf, logp))
        scores, flat = jax.lax.top_k((scores[:, :, None] + logp).reshape(batch, beam * vocab), beam)
        origin, token = flat // vocab, flat % vocab
        tokens = jnp.take_along_axis(tokens, origin[:, :, None], axis=1).at[:, :, t].set(token)
        finished = jnp.take_along_axis(finished, origin, axis=1) | (token == EOS)
        return tokens, scores, finished

    tokens, scores, _ = jax.lax.fori_loop(1, length, step, (tokens, scores, finished))
    return tokens[:, 0], scores[:, 0]
