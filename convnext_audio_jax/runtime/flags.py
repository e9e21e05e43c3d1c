"""The command-line flag groups the tools share, each defined once: the model (``--model``, old spelling
``--checkpoint``), the data (``--data SPEC``, ``--labels``) and the multi-process job (``--coordinator``,
``--num_processes``, ``--process_id``, ``--local_device_ids``, ``--layout``: one table, `JOB_FLAGS`, made into
argparse flags for the ``convnext-audio`` commands, which also take them with dashes, and into absl flags for
train.py). Words as in docs/glossary.md."""

from __future__ import annotations

import argparse
from typing import Any

from convnext_audio_jax.runtime import distributed

MODEL_HELP = ("model directory (written by convert or training), training workdir (its model/best, else model/last) "
              "or pretrained name (convnext-audio models --pretrained)")
ONNX_MODEL_HELP = "; with --backend onnxruntime or openvino: an exported .onnx file"
DATA_HELP = ("DIR@SPLIT (a prepare output), FILE.h5 (packed or PANN index), AUDIO_DIR@CLIPS.csv, "
             "tfds:NAME[/CONFIG][:VERSION]@SPLIT, demo[@SPLIT] (synthetic, at the model's rate) or SPEC+SPEC")
LABELS_HELP = ("class_labels_indices.csv: the data's classes (needed for AUDIO_DIR@CLIPS.csv and tfds:; overrides "
               "the list a prepare output holds)")
# name → (type, help); the help names the JAX_* variable each falls back to (runtime.distributed).
JOB_FLAGS: dict[str, tuple[Any, str]] = {
    "coordinator": (str, "process 0's HOST:PORT (JAX_COORDINATOR_ADDRESS)"),
    "num_processes": (int, "number of processes (JAX_NUM_PROCESSES)"),
    "process_id": (int, "this process's index, 0..N-1 (JAX_PROCESS_ID)"),
    "local_device_ids": (str, "local devices to drive, comma-separated (JAX_LOCAL_DEVICE_IDS)"),
    "layout": (str, f"process layout, one of {', '.join(distributed.LAYOUTS)} (JAX_PROCESS_LAYOUT)"),
}


class _ModelAction(argparse.Action):
    """Stores the model(s) and the spelling used, so a message names the flag the user typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.model_flag = option_string


def add_model_argument(parser: argparse.ArgumentParser, *, several: bool = False, onnx: bool = False) -> None:
    """``--model MODEL`` (``--checkpoint`` is the old spelling, kept): required; ``several``: one or more models
    (an ensemble); ``onnx``: the command also runs an exported .onnx file."""
    help_text = MODEL_HELP + (ONNX_MODEL_HELP if onnx else "") + ("; several: their mean logits, an ensemble"
                                                                  if several else "")
    parser.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="MODEL",
                        nargs="+" if several else None, action=_ModelAction, help=help_text)
    parser.set_defaults(model_flag="--model")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    parser.add_argument("--labels", help=LABELS_HELP)


def add_job_arguments(parser: argparse.ArgumentParser, share: str) -> None:
    """The multi-process flags, in a group whose description says what each process does (``share``)."""
    job = parser.add_argument_group(
        "multi-process job", "run every process with the same arguments and its own --process_id (or the JAX_* "
        "variables, or a SLURM / Open MPI / Kubernetes job: docs/train.md, Multi-host training); " + share)
    for name, (kind, help_text) in JOB_FLAGS.items():
        spellings = [f"--{name}"] if "_" not in name else [f"--{name.replace('_', '-')}", f"--{name}"]
        job.add_argument(*spellings, dest=name, type=kind, help=help_text,
                         metavar="HOST:PORT" if name == "coordinator" else None)


def define_absl_job_flags(absl_flags) -> dict[str, Any]:
    """The multi-process flags as absl flags (train.py; ``absl_flags`` is ``absl.flags``): name → flag holder,
    in `JOB_FLAGS` order, so that ``distributed.initialize(*(holder.value for holder in ...))`` joins the job.
    Every value is checked by `distributed.resolve`, as for the argparse flags."""
    define = {str: absl_flags.DEFINE_string, int: absl_flags.DEFINE_integer}
    return {name: define[kind](name, None, help_text) for name, (kind, help_text) in JOB_FLAGS.items()}


def join_job(args: argparse.Namespace) -> distributed.JoinSpec | None:
    """Join the job the flags (or the environment, or the cluster) describe; a no-op for one process."""
    return distributed.initialize(*(getattr(args, name) for name in JOB_FLAGS))
