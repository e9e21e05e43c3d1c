"""Waveform → log-mel front end, jittable and batched, computed on the accelerator.

Matches torchlibrosa's ``Spectrogram`` + ``LogmelFilterBank`` as used by PANNs and by the
authors' ConvNeXt: centred STFT with reflect padding, periodic Hann window, power 2, librosa
Slaney mel filters, ``10·log10(max(mel, amin))`` with ref 1.0 and no top_db.

Two forms of the STFT give the same numbers: ``stft="fft"`` (``jnp.fft.rfft``, the default) and
``stft="matmul"``, the DFT as two real matrix products with windowed cosine and sine bases. The
matmul form is the export form: ONNX converters mishandle the complex values an FFT produces
(``convnext_audio_jax.export`` selects it), and it needs no FFT kernel on the target.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from convnext_audio_jax.runtime.errors import UserError

STFT_FORMS = ("fft", "matmul")


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
    """Log-mel settings; each model carries one (224 mels for ConvNeXt, 64 for the PANN CNNs)."""

    sample_rate: int = 32_000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 224
    fmin: float = 50.0
    fmax: float = 14_000.0
    amin: float = 1e-10
    clip_seconds: float = 10.0
    stft: str = "fft"  # "fft" (jnp.fft.rfft) or "matmul" (real DFT bases; the export form)

    @property
    def clip_samples(self) -> int:
        """Samples in one training clip (320 000 for 10 s at 32 kHz)."""
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        """STFT frames for a clip of ``num_samples`` (centred: 320 000 samples → 1001 frames)."""
        return 1 + num_samples // self.hop_length

    def validate(self) -> None:
        if self.stft not in STFT_FORMS:
            raise UserError(f"stft must be one of {STFT_FORMS}, got {self.stft!r}")
        if self.n_fft <= 0 or self.hop_length <= 0:
            raise UserError(f"n_fft and hop_length must be positive, got {self.n_fft}, {self.hop_length}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise UserError(
                f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}, "
                f"sample_rate={self.sample_rate}"
            )


@functools.lru_cache(maxsize=16)
def mel_filterbank(config: FrontendConfig) -> np.ndarray:
    """(n_freqs, n_mels) float32 Slaney mel matrix from librosa (torchlibrosa's ``melW``)."""
    import librosa  # imported lazily: only needed to build the constant

    config.validate()
    mel = librosa.filters.mel(
        sr=config.sample_rate,
        n_fft=config.n_fft,
        n_mels=config.n_mels,
        fmin=config.fmin,
        fmax=config.fmax,
        htk=False,
        norm="slaney",
    )
    return np.ascontiguousarray(mel.T.astype(np.float32))


@functools.lru_cache(maxsize=16)
def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window('hann', n, fftbins=True)``)."""
    n = np.arange(n_fft, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def dft_bases(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_fft, n_fft//2 + 1) float32 Hann-windowed cosine and sine bases: ``frames @ cos`` and
    ``frames @ sin`` are the real part and minus the imaginary part of the windowed frames' rfft.
    Built in float64 with the angle reduced modulo n_fft, so the bases are exact to float32."""
    n = np.arange(n_fft)
    angle = 2.0 * np.pi * ((n[:, None] * np.arange(n_fft // 2 + 1)[None, :]) % n_fft) / n_fft
    window = hann_window(n_fft).astype(np.float64)[:, None]
    return (window * np.cos(angle)).astype(np.float32), (window * np.sin(angle)).astype(np.float32)


def validate_waveform(waveform, config: FrontendConfig, *, check_values: bool = True) -> None:
    """Raises ``ValueError`` for a waveform batch the front end cannot take.

    Shape checks always run; the finiteness check runs only on concrete arrays (inside a
    ``jit`` trace the values are unknown: callers check host data before it reaches the device).
    """
    shape = tuple(waveform.shape)
    if len(shape) != 2:
        raise ValueError(
            f"waveform must have shape (batch, samples) at {config.sample_rate} Hz, got shape {shape}"
            + (" (add a batch axis: waveform[None])" if len(shape) == 1 else "")
        )
    if shape[1] < config.n_fft:
        raise ValueError(
            f"clip of {shape[1]} samples is shorter than one STFT window ({config.n_fft} samples = "
            f"{1000 * config.n_fft / config.sample_rate:.0f} ms at {config.sample_rate} Hz); pad it first"
        )
    if check_values and not isinstance(waveform, jax.core.Tracer):
        finite = np.isfinite(np.asarray(waveform, dtype=np.float32))
        if not finite.all():
            bad_rows = np.flatnonzero(~finite.all(axis=1)).tolist()
            raise ValueError(
                f"waveform has NaN/Inf samples in batch rows {bad_rows[:10]}"
                f"{' …' if len(bad_rows) > 10 else ''}; expected finite audio in [-1, 1]"
            )


def _frames(padded: jax.Array, n_fft: int, hop: int, num_frames: int) -> jax.Array:
    """(B, L) → (B, num_frames, n_fft) overlapping frames, built from hop-sized blocks.

    Reshaping into hop-sized blocks and concatenating shifted copies avoids a gather, which is
    several times slower than slices on XLA:CPU.
    """
    blocks_per_frame = -(-n_fft // hop)
    num_blocks = num_frames + blocks_per_frame - 1
    needed = num_blocks * hop
    if jax.export.is_symbolic_dim(padded.shape[1]):
        # A symbolic length (jax.export) cannot be compared with ``needed``; one extra hop always suffices
        # (needed < length + hop) and the slice below drops what is not used.
        padded = jnp.pad(padded, ((0, 0), (0, hop)))
    elif padded.shape[1] < needed:
        padded = jnp.pad(padded, ((0, 0), (0, needed - padded.shape[1])))
    blocks = padded[:, :needed].reshape(padded.shape[0], num_blocks, hop)
    shifted = [blocks[:, k : k + num_frames] for k in range(blocks_per_frame)]
    return jnp.concatenate(shifted, axis=-1)[..., :n_fft]


def power_spectrogram(waveform: jax.Array, config: FrontendConfig) -> jax.Array:
    """(B, samples) → (B, frames, n_fft//2 + 1) power spectrogram, float32."""
    validate_waveform(waveform, config, check_values=False)
    if config.stft not in STFT_FORMS:
        raise ValueError(f"stft must be one of {STFT_FORMS}, got {config.stft!r}")
    x = jnp.asarray(waveform, jnp.float32)
    pad = config.n_fft // 2
    if x.shape[1] <= pad:
        raise ValueError(f"reflect padding needs more than {pad} samples, got {x.shape[1]}")
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    num_frames = config.num_frames(waveform.shape[1])
    frames = _frames(x, config.n_fft, config.hop_length, num_frames)
    if config.stft == "matmul":
        cos, sin = dft_bases(config.n_fft)
        real = jnp.matmul(frames, cos, precision=jax.lax.Precision.HIGHEST)
        imag = jnp.matmul(frames, sin, precision=jax.lax.Precision.HIGHEST)
        return jnp.square(real) + jnp.square(imag)
    spectrum = jnp.fft.rfft(frames * hann_window(config.n_fft), n=config.n_fft, axis=-1)
    return jnp.square(spectrum.real) + jnp.square(spectrum.imag)


def log_mel_spectrogram(waveform: jax.Array, config: FrontendConfig) -> jax.Array:
    """(B, samples) waveform at ``config.sample_rate`` → (B, frames, n_mels) log-mel in dB, float32."""
    validate_waveform(waveform, config)
    power = power_spectrogram(waveform, config)
    mel = jnp.matmul(power, mel_filterbank(config), precision=jax.lax.Precision.HIGHEST)
    return 10.0 * jnp.log10(jnp.maximum(mel, config.amin))
