"""The ``convnext-audio`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from convnext_audio_jax.runtime.errors import UserError, debugging, one_line


def _models_table(args: argparse.Namespace) -> int:
    if args.pretrained:
        from convnext_audio_jax.hub import pretrained

        pretrained.print_table()
        return 0
    from convnext_audio_jax.models import get_spec, list_models
    from convnext_audio_jax.models.catalog import table

    names = args.names or list_models()
    rows = [(name, f"{row['params']:,}", row["input"],
             "-" if args.no_flops or row["gflops"] is None else f"{row['gflops']:.1f}", get_spec(name).description)
            for name, row in zip(names, table(names, flops=not args.no_flops))]

    headers = ("model", "params", "input (10 s clip)", "GFLOPs/clip", "description")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if not args.no_flops:
        print("\nGFLOPs from XLA's cost analysis of one 10 s clip (a multiply-add counts 2; the paper's "
              "21.1 G for ConvNeXt-Tiny counts multiply-adds).")
    return 0


def _build_native(args: argparse.Namespace) -> int:
    from convnext_audio_jax import native

    try:
        path, seconds = native.prepare()
    except native.NativeUnavailable as error:
        print(f"convnext-audio build-native: the native CPU kernels cannot be built here ({error}); the models use "
              "the XLA forms", file=sys.stderr)
        return 1
    print(f"{path}: {'already built' if seconds is None else f'built in {seconds:.1f} s'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnext-audio", description=__doc__)
    parser.add_argument("--offline", action="store_true",
                        help="never use the network for pretrained names (same as CONVNEXT_AUDIO_OFFLINE=1)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error, of a user error too (same as CONVNEXT_AUDIO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="table of registered models: parameters, input, GFLOPs per 10 s clip")
    models.add_argument("names", nargs="*", help="models to list (default: all)")
    models.add_argument("--no-flops", action="store_true", help="skip the XLA cost analysis (faster)")
    models.add_argument("--pretrained", action="store_true", help="list the released checkpoints loadable by name instead")
    models.set_defaults(func=_models_table)

    build_native = sub.add_parser("build-native", help="build the native CPU kernels for this CPU now (once, cached; "
                                  "otherwise when a model is first created)")
    build_native.set_defaults(func=_build_native)

    from convnext_audio_jax import export
    from convnext_audio_jax.data import prepare
    from convnext_audio_jax.downstream import captioning, search
    from convnext_audio_jax.evaluation import evaluate, predict
    from convnext_audio_jax.hub import convert_command as convert_cli
    from convnext_audio_jax.hub import pretrained
    from convnext_audio_jax.inference import commands as inference
    from convnext_audio_jax.serve import command as serve

    for name, add_arguments, run, help_text in [
        ("convert", convert_cli.add_arguments, convert_cli.run,
         "PyTorch checkpoint (authors' AudioSet ConvNeXt, ImageNet ConvNeXt, PANN CNN14/CNN6) → Flax checkpoint"),
        ("prepare", prepare.add_arguments, prepare.run,
         "decode, resample and pack audio clips + labels into ArrayRecord or HDF5 shards for training"),
        ("evaluate", evaluate.add_arguments, evaluate.run,
         "mAP/AUC/d' of a checkpoint on a labelled dataset, with per-class reports"),
        ("predict", predict.add_arguments, predict.run,
         "teacher logits (one model or an ensemble's mean) for every clip of a dataset, for distillation"),
        ("tag", inference.add_tag_arguments, inference.run_tag,
         "tag audio files (any format, rate, channels, length); --frames adds sound-event timelines"),
        ("embed", inference.add_embed_arguments, inference.run_embed,
         "scene/frame/sequence embeddings or logits of audio files into an .npz"),
        ("download", pretrained.add_download_arguments, pretrained.run_download,
         "fetch, verify and convert released checkpoints by name into the cache (convnext-audio models --pretrained)"),
        ("index", search.add_index_arguments, search.run_index,
         "index audio files for text search with a trained retrieval model (resumable, like embed) into an .h5"),
        ("search", search.add_search_arguments, search.run_search,
         "the files of an index that best match a text query, with the best window's time"),
        ("caption", captioning.add_caption_arguments, captioning.run_caption,
         "captions of each window of audio files by a trained captioning model"),
        ("export", export.add_arguments, export.run,
         "a checkpoint as a StableHLO (jax.export, CPU + CUDA) or ONNX file: waveform in, probabilities and embeddings out"),
        ("serve", serve.add_arguments, serve.run,
         "a web page and a JSON API for tagging (upload, microphone, live mode) on 127.0.0.1:7860 ([serve] extra)"),
    ]:
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command. A UserError (a path, a flag, a file's content: what the user can fix) is one line and exit
    code 2, unless ``--debug``; any other exception is a bug and keeps its traceback. ``--offline`` reaches the
    commands in ``args`` (``hub.resolve.offline_flag``)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if debugging(args.debug):
            raise
        print(f"convnext-audio {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
