"""Train a model: ``python train.py --config configs/<name>.py --workdir DIR [--config.key=value ...]``.

Runs under absl.app, so flags are parsed before grain starts worker processes. Multi-host jobs (a
coordinator address, SLURM or Open MPI) call ``jax.distributed.initialize()`` first.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from convnext_audio_jax import training
from convnext_audio_jax.data.pipeline import UnreadableSourceError

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for config.json, checkpoints, model/{best,last}, metrics.jsonl and TensorBoard events")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain log every save at INFO
    logging.getLogger("convnext_audio_jax").setLevel(logging.INFO)
    training.maybe_initialize_distributed()
    try:
        result = training.train(_CONFIG.value, _WORKDIR.value)
    except (training.ConfigError, training.NonFiniteLossError, training.TooManySkippedError,
            UnreadableSourceError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    if result:
        print(f"final validation mAP {result['val_mAP']:.4f} (best {result['best_val_mAP']:.4f}) at step {result['step']}")
    return 0


if __name__ == "__main__":
    app.run(main)
