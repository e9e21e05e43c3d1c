"""The communication of the data-parallel programs, read from their compiled HLO on simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/collectives.py [--models convnext_tiny cnn14]
        [--per-device 2] [--accumulation 1 2] [--forms xla native]

For each model, form (XLA ops, as a GPU runs, or the CPU's native kernels) and accumulation: the train step's,
the eval step's and the sharded forward's collectives (op, count, bytes, how many sit in a loop) next to the
gradient's bytes. Compiling takes ~1-3 min per full-size model and form on a 2-core CPU. Prints a Markdown
table; ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from convnext_audio_jax.evaluation.evaluate import Scorer  # noqa: E402
from convnext_audio_jax.models import create_model, init_variables, with_xla_ops  # noqa: E402
from convnext_audio_jax.runtime import collectives  # noqa: E402
from convnext_audio_jax.runtime.forward import ShardedForward  # noqa: E402
from convnext_audio_jax.runtime.sharding import data_mesh  # noqa: E402
from convnext_audio_jax.training import step as step_lib  # noqa: E402
from convnext_audio_jax.training.augment import AugmentConfig  # noqa: E402


def programs(model, per_device: int, accumulation: int, mesh, seconds: float | None = None):
    """{"train", "eval", "forward"}: the optimized HLO text of each program, and the gradient's bytes."""
    frontend = model.frontend
    samples = frontend.clip_samples if seconds is None else int(round(seconds * frontend.sample_rate))
    devices = mesh.size
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(lambda: step_lib.init_train_state(model, tx, 0, mesh))
    train = step_lib.make_train_step(model, tx, AugmentConfig(), accumulation, mesh)
    rows = 2 * per_device * devices * accumulation  # mixup: two clips per example
    batch = {"waveform": jax.ShapeDtypeStruct((rows, samples), jnp.int16),
             "target": jax.ShapeDtypeStruct((rows, model.num_classes), jnp.float32)}
    texts = {"train": train.lower(state, batch).compile().as_text()}
    scorer = Scorer(model, mesh)
    texts["eval"] = scorer._score.lower(variables, jax.ShapeDtypeStruct((per_device * devices, samples),
                                                                        jnp.int16)).compile().as_text()
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), variables)
    forward = ShardedForward(model, zeros, per_device * devices, mesh)
    texts["forward"] = forward._forward.lower(variables, jax.ShapeDtypeStruct((per_device * devices, samples),
                                                                              jnp.float32)).compile().as_text()
    return texts, collectives.tree_bytes(variables["params"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["convnext_tiny", "cnn14"])
    parser.add_argument("--per-device", type=int, default=2, help="examples per device per micro-batch")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--forms", nargs="+", default=["xla", "native"], choices=["xla", "native"])
    parser.add_argument("--seconds", type=float, default=None, help="clip length (default: the model's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    mesh = data_mesh()
    rows = []
    for name in args.models:
        for form in args.forms:
            model = create_model(name)
            model = with_xla_ops(model) if form == "xla" else model
            for accumulation in args.accumulation:
                texts, grad_bytes = programs(model, args.per_device, accumulation, mesh, args.seconds)
                for program, text in texts.items():
                    if program != "train" and accumulation != args.accumulation[0]:
                        continue
                    for op, row in sorted(collectives.summary(collectives.collectives(text)).items()):
                        rows.append({"model": name, "form": form, "accumulation": accumulation, "program": program,
                                     "op": op, **row, "grad_bytes": grad_bytes})
                    print(f"# {name} {form} K={accumulation} {program} done", file=sys.stderr, flush=True)
    print(f"{mesh.size} devices, {args.per_device} examples per device per micro-batch\n")
    print("| model | form | K | program | op | count | in loop | MiB | / gradient |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['form']} | {r['accumulation']} | {r['program']} | {r['op']} | {r['count']} | "
              f"{r['in_loop']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / r['grad_bytes']:.3f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
