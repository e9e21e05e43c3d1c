"""The tiny demo config the training tests share (a 24-step run of an (8, 16, 32, 64) ConvNeXt), the tests'
one config loader, a batch of demo clips, and the compiler options of train steps that tests only inspect or run once."""

import pathlib
import tempfile

import ml_collections
import numpy as np

from convnext_audio_jax.data import demo
from convnext_audio_jax.runtime import xla
from convnext_audio_jax.training.check import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]

# LLVM at -O0 for train steps a test inspects or runs once: what those tests prove lives in the program XLA's HLO
# passes build (the partitioning over devices and its collectives, the accumulation loop, the skip's select), which
# LLVM's level leaves as it is (the optimized HLO text is the same as at the default -O3, checked on the tests'
# models), or in values compared to a tolerance far above the ~1e-7 that -O0 moves them; their machine code
# compiles ~25 % faster.
STEP_COMPILE_OPTIONS = {**xla.compiler_options("cpu"), "xla_backend_optimization_level": 0}

TINY_CONFIG = """
from configs.demo import get_config as demo_config


def get_config():
    config = demo_config()
    config.model.overrides.dims = (8, 16, 32, 64)
    config.data.demo_train_clips = 256
    config.data.demo_val_clips = 32
    config.data.demo_eval_clips = 32
    config.batch_size = 16
    config.eval_batch_size = 32
    config.total_steps = 24
    config.checkpoint_every = 4
    config.eval_every = 12
    config.log_every = 1
    config.progress_bar = False
    return config
"""


def load_config(config: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (a path, or a name under configs/: "demo"), or of a config file's text,
    loaded as train.py loads ``--config`` (training.check.load_config_file), so the tests read configs as users'
    runs do."""
    if isinstance(config, pathlib.Path) or "\n" not in config:
        path = pathlib.Path(config)
        return load_config_file(str(path if path.suffix == ".py" else REPO / "configs" / f"{config}.py"))
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "config.py"
        path.write_text(config)
        return load_config_file(str(path))


def tiny_config() -> ml_collections.ConfigDict:
    return load_config(TINY_CONFIG)


def demo_batch(rows: int) -> dict:
    """The first ``rows`` clips of the demo's training split (16 kHz, 1 s): int16 "waveform", "target", "id"."""
    source = demo.SyntheticAudioSet("train", rows, sample_rate=16_000, clip_seconds=1.0)
    clips = [source[i] for i in range(rows)]
    return {"waveform": np.stack([c["waveform"] for c in clips]), "target": np.stack([c["target"] for c in clips]),
            "id": np.array([c["id"] for c in clips])}
