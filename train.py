"""Train a model: ``python train.py --config configs/<name>.py --workdir DIR [--config.KEY=VALUE ...] [--check]``.

``--check`` makes a run's set-up checks (config, data, teacher, init_from, the
multi-process settings resolved but not joined, the workdir) and prints one line: ``ok: ...`` (exit 0) or the
first problem (exit 1); it trains nothing and leaves the workdir as it is, absent or not
(convnext_audio_jax.training.check). A problem the user can fix (config, data, workdir, multi-process settings) is
one line ``train.py: error: ...`` and exit 1, as is a run stopped by a non-finite loss; ``--debug`` (or
``CONVNEXT_AUDIO_DEBUG=1``) shows their traceback, and any other error always has one.

Runs under absl.app, so flags are parsed before grain starts worker processes. A multi-process job joins
its cluster first (convnext_audio_jax.runtime.distributed): ``--coordinator HOST:PORT --num_processes N --process_id I``,
the JAX_* variables, or SLURM / Open MPI / Kubernetes / Cloud TPU detection (docs/train.md, "Multi-host
training"). On Linux with glibc, computing on the CPU, it first runs itself again, once, with glibc set to keep freed memory and JAX's CPU
dispatch synchronous, so that XLA:CPU's per-step temporaries are not page-faulted afresh each step
(convnext_audio_jax.runtime.host_memory; CONVNEXT_AUDIO_JAX_KEEP_FREED_MEMORY=0 turns that off).
"""

import logging
import sys

if __name__ == "__main__":  # first: it may run this command again with glibc's allocator set (host_memory)
    from convnext_audio_jax.runtime import host_memory

    host_memory.keep_freed_memory()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from convnext_audio_jax import training
from convnext_audio_jax.runtime import distributed  # noqa: E402
from convnext_audio_jax.runtime import flags as runtime_flags
from convnext_audio_jax.runtime.errors import UserError, debugging, one_line
from convnext_audio_jax.training import check

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for config.json, checkpoints, model/{best,last}, metrics.jsonl and TensorBoard events")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process jobs (docs/train.md, "Multi-host training"): the flags every multi-process command takes
# (convnext_audio_jax.runtime.flags); each falls back to its JAX_* variable.
_JOB = runtime_flags.define_absl_job_flags(flags)
_CHECK = flags.DEFINE_bool("check", False, "check config, data, multi-process settings and workdir; print one line, "
                           "exit 0 (ok) or 1; train nothing, leave the workdir as it is")
_DEBUG = flags.DEFINE_bool("debug", False, "show the traceback of every error, of a user error too "
                           "(CONVNEXT_AUDIO_DEBUG=1)")
# One line and exit 1: what the user can fix (config, data, workdir, multi-process settings: UserError), and a run
# stopped by a non-finite loss (the message says where its last good checkpoint is). Anything else is a bug: traceback.
ONE_LINE_ERRORS = (UserError, training.NonFiniteLossError)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, after a look at --config and its overrides: a missing file or a --config.KEY the config
    lacks is one line naming it (ml_collections would raise a traceback)."""
    problem = check.command_line_problem(flags.FLAGS.read_flags_from_files(argv, force_gnu=False))
    if problem:
        print(f"train.py: error: {problem}", file=sys.stderr)
        sys.exit(1)
    return app.parse_flags_with_usage(argv)


def main(argv, on_batch=None):
    """absl's main. ``on_batch(step, clip_ids)`` goes to ``training.train``: for a caller that runs this main with
    ``app.run`` itself, to see the clips of every step."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain log every save at INFO
    logging.getLogger("convnext_audio_jax").setLevel(logging.INFO)
    try:
        return _run(on_batch)
    except ONE_LINE_ERRORS as error:
        if debugging(_DEBUG.value):
            raise
        print(f"train.py: error: {one_line(error)}", file=sys.stderr)
        return 1


def _job_values() -> list:
    """coordinator, num_processes, process_id, local_device_ids, layout: `distributed.resolve`'s arguments."""
    return [holder.value for holder in _JOB.values()]


def _run_downstream(task: str) -> int:
    """A downstream config (``config.task``: retrieval or captioning, on a frozen encoder): its own trainer, the
    same workdir layout (config.json, metrics.jsonl, checkpoints/, model/best and model/last)."""
    from convnext_audio_jax.downstream import captioning, retrieval

    trainers = {retrieval.TASK: retrieval, captioning.TASK: captioning}
    if task not in trainers:
        raise UserError(f"config.task {task!r}: expected 'tagging', {' or '.join(map(repr, trainers))}")
    trainer = trainers[task]
    if _CHECK.value:
        trainer.check_config(_CONFIG.value)
        print(f"train.py: ok: {task} config")
        return 0
    result = trainer.train(_CONFIG.value, _WORKDIR.value)
    if result:
        print(f"final {trainer.BEST} {result[trainer.BEST]:.4f} (best {result['best_' + trainer.BEST]:.4f}) "
              f"at step {result['step']}")
    return 0


def _run(on_batch) -> int:
    task = _CONFIG.value.get("task", "tagging")
    if task != "tagging":
        return _run_downstream(task)
    if _CHECK.value:
        summary = check.check_run(_CONFIG.value, _WORKDIR.value, *_job_values())
        print(f"train.py: {summary}")
        return 0
    distributed.initialize(*_job_values())
    result = training.train(_CONFIG.value, _WORKDIR.value, on_batch=on_batch)
    if result and jax.process_index() == 0:
        print(f"final validation mAP {result['val_mAP']:.4f} (best {result['best_val_mAP']:.4f}) at step {result['step']}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
