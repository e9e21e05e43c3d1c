"""Data-parallel training with the paper's recipe (Pellegrini et al., Interspeech 2023, section 6).

One module per concern:

- ``config``: every config key with defaults, validation (``ConfigError``), batch layout, the model, config.json
- ``data``: the training / validation (incl. ``holdout:``) / eval sources from ``config.data``'s SPECs
- ``optimizer``: AdamW + torch-OneCycleLR schedule, and the host-side learning rate for logging
- ``step``: ``TrainState``, the loss and the jitted data-parallel train step
- ``checkpointing``: orbax train-state checkpoints, ``WORKDIR/model/{best,last}``, ``init_from``
- ``check``: ``train.py --check`` (a run's set-up, nothing trained or created) and misspelt ``--config.KEY``s
- ``loop``: ``train(config, workdir)``

Evaluation is ``convnext_audio_jax.evaluation.evaluate.evaluate`` (the engine ``convnext-audio evaluate`` uses too);
one run per workdir is ``convnext_audio_jax.artifacts.lock``.
"""

from convnext_audio_jax.artifacts.lock import WorkdirLockedError
from convnext_audio_jax.training.config import ConfigError, default_config
from convnext_audio_jax.training.loop import (
           NonFiniteLossError,
           TooManySkippedError,
           train,
)

__all__ = ["ConfigError", "NonFiniteLossError", "TooManySkippedError", "WorkdirLockedError", "default_config",
           "train"]
