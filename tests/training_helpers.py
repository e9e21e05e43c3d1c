"""The tiny demo config the training tests share (a 24-step run of an (8, 16, 32, 64) ConvNeXt)."""

import ml_collections

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


def tiny_config() -> ml_collections.ConfigDict:
    namespace: dict = {}
    exec(TINY_CONFIG, namespace)
    return namespace["get_config"]()
