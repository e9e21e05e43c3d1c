"""The tiny demo config the training tests share (a 24-step run of an (8, 16, 32, 64) ConvNeXt), and the tests'
one config loader."""

import pathlib
import tempfile

import ml_collections

from convnext_audio_jax.training.check import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]

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
