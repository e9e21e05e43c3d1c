"""Command line: ``python -m convert SOURCE OUTPUT_DIR`` (and ``convnext-audio convert``).

``add_arguments`` and ``run`` are shared by both entry points.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys

from convnext_audio_jax.artifacts.model_dir import check_model_output, save_model
from convnext_audio_jax.convert.conversion import (
    STEM_INITS,
    convert_state_dict,
    to_torch_state_dict,
)
from convnext_audio_jax.convert.files import (
    ConversionError,
    load_torch_state_dict,
    save_torch_state_dict,
)
from convnext_audio_jax.convert.layouts import LAYOUTS
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.hub.resolve import load_model, offline_flag
from convnext_audio_jax.models import create_model
from convnext_audio_jax.runtime.errors import UserError, debugging, one_line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("source", help="PyTorch checkpoint (.pth/.pt/.safetensors); with --to-torch a model directory "
                        "or a training workdir (its model/best, else model/last)")
    parser.add_argument("output", help="output checkpoint directory; with --to-torch a .pth/.pt/.safetensors file")
    parser.add_argument("--model", help="registered model name (default: the model the checkpoint holds; an audio "
                        "ConvNeXt name with an ImageNet checkpoint gives the paper's ImageNet initialisation)")
    parser.add_argument("--labels", help="class_labels_indices.csv whose names and ids are stored in the model (default: "
                        "AudioSet's 527 classes, shipped with the package, for a 527-class model)")
    parser.add_argument("--num-classes", type=int, help="classifier size when it differs from the model's default (527 / 1000)")
    parser.add_argument("--stem-init", choices=STEM_INITS, default="fresh",
                        help="ImageNet init of an audio ConvNeXt: fresh stem conv (the paper) or the RGB kernel averaged to one channel")
    parser.add_argument("--seed", type=int, default=0, help="seed of freshly initialised parts (ImageNet init)")
    parser.add_argument("--allow-frontend-mismatch", action="store_true",
                        help="convert even if the checkpoint's STFT/mel tensors differ from our front end (recorded in the metadata)")
    parser.add_argument("--to-torch", action="store_true", help="convert a Flax checkpoint directory back to a PyTorch state dict")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), help="--to-torch key layout (default: the model's original one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing model directory or output file (never a folder that holds anything else)")
    return parser


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _class_labels(args) -> tuple[labels_lib.ClassLabels | None, str | None]:
    """The class list given with --labels and where it came from."""
    if not args.labels:
        return None, None
    return labels_lib.read_class_labels(args.labels), pathlib.Path(args.labels).name


def _to_flax(args) -> str:
    source = pathlib.Path(args.source)
    output = pathlib.Path(args.output)
    check_model_output(output, args.overwrite)  # before any work: never replaces a folder that is not a model
    class_labels, labels_from = _class_labels(args)
    state_dict = load_torch_state_dict(source)
    result = convert_state_dict(
        state_dict,
        args.model,
        num_classes=args.num_classes,
        stem_init=args.stem_init,
        seed=args.seed,
        allow_frontend_mismatch=args.allow_frontend_mismatch,
    )
    classes = result.model_config.get("num_classes") or _default_classes(result.model_name)
    audioset = labels_lib.audioset_class_labels()
    if class_labels is None and classes == audioset.num_classes:
        class_labels, labels_from = audioset, "AudioSet class_labels_indices.csv (shipped with convnext_audio_jax)"
    if class_labels is not None and class_labels.num_classes != classes:
        raise ConversionError(f"{labels_from} lists {class_labels.num_classes} classes, {result.model_name} has {classes}")
    metadata = {
        "source": {"file": source.name, "sha256": file_sha256(source), "layout": result.layout},
        "conversion": result.notes,
    }
    if class_labels is not None:
        metadata.update(class_names=list(class_labels.display_names), class_ids=list(class_labels.mids),
                        class_labels_from=labels_from)
    save_model(output, result.model_name, result.variables, metadata, result.model_config, overwrite=args.overwrite)
    summary = f"converted {source.name} ({result.layout} layout) → {result.model_name} in {output}"
    if "imagenet_init" in result.notes:
        summary += f"; ImageNet init, fresh: {', '.join(result.notes['imagenet_init']['fresh'])}"
    if class_labels is None:
        summary += f"; no class names stored ({classes} classes; --labels adds them)"
    return summary


def _default_classes(model_name: str) -> int:
    return create_model(model_name).num_classes


def _to_torch(args) -> str:
    output = pathlib.Path(args.output)
    if output.is_dir():
        raise ConversionError(f"output {output} is a directory: expected a .pth, .pt or .safetensors file name")
    if output.exists() and not args.overwrite:
        raise ConversionError(f"output {output} exists (--overwrite replaces it)")
    model, variables, metadata = load_model(args.source, offline=offline_flag(args))
    state_dict = to_torch_state_dict(metadata["model"], variables, metadata["model_config"], args.layout)
    save_torch_state_dict(state_dict, output)
    return f"wrote {len(state_dict)} tensors of {metadata['model']} to {output}"


def run(args: argparse.Namespace) -> int:
    """Runs a parsed command; a user error (ConversionError, CheckpointError, ...) prints one line to stderr and
    returns 1, writing nothing; ``--debug`` (or CONVNEXT_AUDIO_DEBUG=1) raises it instead, and any other error is
    raised with its traceback."""
    try:
        print(_to_torch(args) if args.to_torch else _to_flax(args))
    except UserError as error:
        if debugging(getattr(args, "debug", False)):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert PyTorch ConvNeXt / PANN checkpoints to this project's Flax checkpoints (and back with --to-torch).",
    )
    # Here, not in add_arguments: `convnext-audio --debug` is the global flag of that command.
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (CONVNEXT_AUDIO_DEBUG=1)")
    return run(add_arguments(parser).parse_args(argv))
