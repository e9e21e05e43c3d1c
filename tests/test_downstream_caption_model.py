"""The captioning decoder: tokenizer round trip, the paper's size, the label-smoothed loss against optax's
definition written out, and jitted beam search: beam 1 equals step-by-step greedy argmax decoding, and beam 2's
scores are its captions' log-probabilities under the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convnext_audio_jax.downstream import caption_model as cm

SMALL = dict(max_length=8, width=32, layers=2, heads=4, feedforward=64, dropout=0.0)


def test_tokenizer_round_trip():
    tokenizer = cm.Tokenizer.from_captions(["A dog barks.", "a dog, a cat"], min_count=1)
    assert tokenizer.words[:4] == list(cm.SPECIALS) and set(tokenizer.words[4:]) == {"a", "barks", "cat", "dog"}
    ids = tokenizer.encode("A cat barks loudly", 8)
    assert ids[0] == cm.BOS and cm.UNK in ids and list(ids).count(cm.EOS) == 1 and ids[-1] == cm.PAD
    assert tokenizer.decode(ids) == "a cat barks <unk>"
    assert tokenizer.decode(tokenizer.encode("a dog a dog a dog a dog", 6)) == "a dog a dog"  # cut to fit


def test_paper_size_decoder():
    decoder = cm.CaptionDecoder(vocab_size=5000)  # AudioCaps' vocabulary is about this size
    shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), jnp.zeros((1, 31, 768)),
                                                 jnp.zeros((1, 29), jnp.int32)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 11.5e6 < count < 13e6, count  # the paper: 12.4 M trainable parameters


def test_loss_and_beam_search():
    decoder = cm.CaptionDecoder(vocab_size=12, **SMALL)
    audio = jax.random.normal(jax.random.key(1), (3, 5, 16))
    tokens = jnp.array([[cm.BOS, 5, 6, cm.EOS, 0, 0, 0, 0]] * 3)
    # Jitted: run eagerly, every operation of the decoder compiles on its own (most of this test's time).
    params = jax.jit(decoder.init)(jax.random.key(2), audio, tokens[:, :-1])["params"]
    logits = jax.jit(decoder.apply)({"params": params}, audio, tokens[:, :-1])
    loss = cm.caption_loss(logits, tokens, 0.1)
    logp = jax.nn.log_softmax(logits[:, :3])  # the three real targets 5, 6, <eos>
    targets = jax.nn.one_hot(tokens[:, 1:4], 12) * 0.9 + 0.1 / 12
    assert float(loss) == pytest.approx(float(-(targets * logp).sum(-1).mean()), rel=1e-5)

    # Greedy by hand: the argmax over words and <eos> of the next token, one step at a time. The prefix is padded
    # to the full length (one compiled shape): the causal mask keeps later positions out of position t's output.
    length = SMALL["max_length"]
    forward = jax.jit(lambda audio, row: jax.nn.log_softmax(decoder.apply({"params": params}, audio, row[None])[0]))
    allowed = jnp.arange(12) > cm.BOS
    greedy, _ = cm.beam_search(decoder, params, audio, 1, length)
    for b in range(3):
        row = np.zeros(length, np.int32)
        row[0] = cm.BOS
        for t in range(1, length):
            row[t] = int(jnp.argmax(jnp.where(allowed, forward(audio[b : b + 1], jnp.asarray(row))[t - 1], -jnp.inf)))
            if row[t] == cm.EOS:
                break
        np.testing.assert_array_equal(np.asarray(greedy[b]), row)

    def score(row, b):
        out = forward(audio[b : b + 1], row)
        end = list(row).index(cm.EOS) if cm.EOS in list(row) else length - 1
        return float(sum(out[t, row[t + 1]] for t in range(end)))

    best, scores = cm.beam_search(decoder, params, audio, 2, length)
    assert not np.array_equal(np.asarray(best), np.asarray(greedy))  # the beam found other captions
    for b in range(3):
        assert scores[b] == pytest.approx(score(best[b], b), abs=1e-4)
