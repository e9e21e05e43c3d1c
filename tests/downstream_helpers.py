"""A tiny frozen encoder for the downstream tests: a random (8, 16, 32, 64) ConvNeXt on the demo's input (16 kHz,
1 s, 64 mels) with the demo's ten class names; random weights, so its logits are random features of the audio.
``tiny_encoder`` (import it into a test module) saves it once per test process: its initialisation compiles."""

import jax
import numpy as np
import pytest

from convnext_audio_jax.artifacts.model_dir import save_model
from convnext_audio_jax.data import demo
from convnext_audio_jax.models import create_model, init_variables

TINY_DEMO = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=demo.NUM_CLASSES,
                 frontend=dict(sample_rate=16_000, n_fft=512, hop_length=160, n_mels=64, fmax=8_000.0,
                               clip_seconds=1.0))


def save_tiny_encoder(directory):
    model = create_model("convnext_tiny", **TINY_DEMO)
    variables = init_variables(model, jax.random.key(0))
    variables = jax.tree.map(np.asarray, variables)
    return save_model(directory, "convnext_tiny", variables, {"class_names": list(demo.CLASS_NAMES)}, TINY_DEMO)


_SAVED: list = []  # each test module that imports the fixture gets its own copy of it: one folder for all


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """The saved tiny encoder's folder (read-only for the tests)."""
    if not _SAVED:
        _SAVED.append(save_tiny_encoder(tmp_path_factory.mktemp("downstream") / "encoder"))
    return _SAVED[0]


def save_retrieval_model(folder, encoder):
    """An untrained projection of the tiny encoder's logits (+tags) saved as a retrieval model in ``folder``: the
    index and search mechanics do not depend on what it learned."""
    from convnext_audio_jax.downstream import retrieval

    rng = np.random.default_rng(0)
    tags = rng.normal(size=(10, 384)).astype(np.float32)
    params = retrieval.init_params(0, 10 + 384, 384, 0.07)
    arrays = {"mean": rng.normal(size=394).astype(np.float32), "std": np.full(394, 2.0, np.float32),
              "tag_embeddings": tags}
    document = {"task": "retrieval", "encoder": str(encoder), "audio_features": "logits", "tags": True,
                "text_model": "all-MiniLM-L6-v2", "hop_seconds": 0.5, "sample_rate": 16_000}
    retrieval._save_model(folder, params, arrays, document)
    return retrieval.RetrievalModel(folder)
