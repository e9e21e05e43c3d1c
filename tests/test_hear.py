"""The HEAR 2021 API module: load_model, get_scene_embeddings, get_timestamp_embeddings (shapes, dtypes, spacing,
centring, lengths 0.1 s to 65 s, a batch of 3, determinism) against the JAX model on the same windows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import soxr
import torch  # noqa: E402  ([test] extra: a missing torch fails, not skips)

from convnext_audio_jax import hear  # noqa: E402
from convnext_audio_jax.artifacts.model_dir import save_model  # noqa: E402
from convnext_audio_jax.models import create_model, init_variables  # noqa: E402

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=4)
RATE = hear.SAMPLE_RATE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = create_model("convnext_tiny", **TINY)
    variables = init_variables(model, jax.random.key(5))
    directory = save_model(tmp_path_factory.mktemp("hear") / "tiny", "convnext_tiny", variables, model_config=TINY)
    return model, variables, hear.load_model(str(directory))


def sounds(seconds: float, count: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * RATE))) / RATE
    rows = [0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t) for i in range(count)]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def test_model_attributes(tiny):
    _, _, model = tiny
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 48_000 and type(model.sample_rate) is int
    assert model.scene_embedding_size == 64 and type(model.scene_embedding_size) is int
    assert model.timestamp_embedding_size == 64 and type(model.timestamp_embedding_size) is int


def test_empty_path_says_how_to_get_weights():
    with pytest.raises(ValueError, match="convnext-audio convert"):
        hear.load_model("")
    with pytest.raises(ValueError, match=r"pretrained name.*load_model\('convnext_tiny_471mAP'\)"):
        hear.load_model("")
    with pytest.raises(ValueError, match="convnext-audio convert"):
        hear.load_model()


@pytest.mark.parametrize("seconds", [0.1, 1.0, 10.0])
def test_batch_of_three(tiny, seconds):
    jax_model, variables, model = tiny
    audio = sounds(seconds, 3)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.dtype == torch.float32 and scene.shape == (3, 64)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32 and timestamps.dtype == torch.float32
    count = timestamps.shape[1]
    assert embeddings.shape == (3, count, 64) and timestamps.shape == (3, count)
    duration_ms = 1000 * seconds
    assert count >= 1 and (count == 1 or timestamps[0, -1] < duration_ms)
    assert timestamps[0, -1] + 40.0 >= min(duration_ms, 115.0 + 40.0 * (count - 1))
    gaps = np.diff(timestamps[0].numpy())
    assert (gaps <= 50.0).all() and (np.abs(gaps - gaps.mean()) <= 1.0).all() if count > 1 else True
    assert torch.equal(timestamps[0], timestamps[2])

    # The JAX model on the resampled sound, zero-padded to one window: the scene embedding, and every 8th timestamp
    # embedding (pass 0) is the sequence of that window.
    resampled = soxr.resample(audio.numpy().T, RATE, 32_000, quality="HQ").T.astype(np.float32)
    window = np.zeros((3, 320_000), np.float32)
    window[:, : resampled.shape[1]] = resampled
    outputs = jax.jit(jax_model.apply)(variables, window)
    np.testing.assert_allclose(scene.numpy(), outputs["scene_embedding"], atol=1e-5)
    pass_zero = embeddings[:, ::8].numpy()
    np.testing.assert_allclose(pass_zero, np.asarray(outputs["sequence_embeddings"])[:, : pass_zero.shape[1]], atol=1e-5)


def test_timestamps_are_centred_and_40_ms_apart(tiny):
    _, _, model = tiny
    embeddings, timestamps = hear.get_timestamp_embeddings(sounds(1.0, 1), model)
    # Step 0 covers STFT frames [-4, 28) (frame f centred at 10 f ms): centre 115 ms; then every 40 ms.
    np.testing.assert_allclose(timestamps[0].numpy(), 115.0 + 40.0 * np.arange(timestamps.shape[1]), atol=1e-3)
    assert model.passes == 8 and model.hop_samples == 1280
    # A pass shifted by one hop sees the sound 40 ms later: its step 0 is the sequence of the shifted window.
    assert embeddings.shape[1] == 23  # 115, 155, …, 995 ms < 1000 ms


def test_sixty_five_seconds_and_determinism(tiny):
    _, _, model = tiny
    audio = sounds(65.0, 1, seed=4)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    gaps = np.diff(timestamps[0].numpy())
    assert np.abs(gaps - 40.0).max() <= 1.0
    assert timestamps[0, -1] < 65_000 <= timestamps[0, -1] + 40.0
    assert embeddings.shape == (1, timestamps.shape[1], 64) and torch.isfinite(embeddings).all()
    again, again_timestamps = hear.get_timestamp_embeddings(audio, model)
    assert torch.equal(embeddings, again) and torch.equal(timestamps, again_timestamps)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (1, 64) and torch.equal(scene, hear.get_scene_embeddings(audio, model))


def test_bad_audio_is_a_clear_error(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match=r"shape \(n_sounds, n_samples\) at 48000 Hz"):
        hear.get_scene_embeddings(torch.zeros(48_000), model)
    bad = torch.zeros(2, 4800)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        hear.get_timestamp_embeddings(bad, model)
