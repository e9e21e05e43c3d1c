"""Clips/s of a full training step (speed perturbation, log-mel, bn0, SpecAugment, mixup, forward,
backward, AdamW) for an audio model at the paper's input (10 s at 32 kHz; ConvNeXt: 224 mels, PANNs: 64).

    python benchmarks/train_step.py [--model convnext_tiny] [--batch 8] [--steps 3] [--devices 1,2,4,8] [--dtype float32]
                                    [--depthwise-impls auto,shift] [--keep-freed-memory]

Rows: ours (JAX, one jitted step on a 'data' mesh of 1, 2, ... devices; on a CPU the devices are
simulated and share its cores, so the scaling rows measure the cost of sharding, not a speed-up) and the
PyTorch reference (convnext_audio_jax/convert/torch_reference.py: the authors' ConvNeXt from timm blocks +
torchlibrosa, PANNs' CNN14 / CNN6) with the same augmentations and torch.optim.AdamW. A step trains on ``batch`` mixed examples, i.e. 2 x batch clips
drawn; clips/s counts the ``batch`` examples. Median over ``steps`` timed steps after one warm-up step. "first step
s": the first call (ours: compile included); "compile s": ours' ``lower(...).compile()`` alone.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository: the package


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny", help="a registered audio model")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (2x clips with mixup)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--devices", default="1,8", help="mesh sizes to time, comma-separated")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (paper: 10)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="as train.py does (convnext_audio_jax.runtime.host_memory): glibc keeps freed memory, JAX's CPU "
                             "dispatch is synchronous; torch's rows then run under the same allocator")
    parser.add_argument("--depthwise-impls", default="auto",
                        help="model.depthwise_impl values to time, comma-separated (e.g. native,shift: the compiled "
                             "kernel gradient against the XLA form)")
    return parser.parse_args()


def time_steps(run_step, steps: int) -> tuple[float, float]:
    """(first-call seconds, compile included; median seconds of the next ``steps`` calls)."""
    start = time.perf_counter()
    run_step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def jax_rows(args, clips, targets) -> list[tuple[str, float, float]]:
    import jax

    from convnext_audio_jax.models import get_spec
    from convnext_audio_jax.runtime.sharding import data_mesh
    from convnext_audio_jax.training import config as config_lib
    from convnext_audio_jax.training import optimizer
    from convnext_audio_jax.training import step as step_lib

    config = config_lib.default_config()
    config.model.name = args.model
    config.model.overrides.update(getattr(args, "overrides", None) or {})
    if "drop_path_rate" not in get_spec(config.model.name).module.__dataclass_fields__:
        config.model.drop_path_rate = 0.0  # the PANN CNNs have dropout, not drop path
    config.model.dtype = args.dtype
    config.model.cpu_bfloat16 = "keep"  # measure bfloat16 itself, also where training would fall back to float32
    config.model.frontend.clip_seconds = args.seconds
    config.total_steps = 1000
    model = config_lib.build_model(config, num_classes=527)
    tx = optimizer.make_optimizer(config.optimizer, config.total_steps)
    rows = []
    for count in (int(n) for n in args.devices.split(",")):
        if count > jax.device_count() or args.batch % count:
            print(f"skipping {count} devices: {jax.device_count()} available; the batch ({args.batch}) must be a "
                  "multiple of the devices so that mixup pairs stay on one device", file=sys.stderr)
            continue
        mesh = data_mesh(jax.devices()[:count])
        state = step_lib.init_train_state(model, tx, 0, mesh)
        step = step_lib.make_train_step(model, tx, config_lib.augment_config(config), 1, mesh)
        batch = step_lib.global_batch({"waveform": clips, "target": targets}, mesh)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()  # compile time alone (issue 15's target)
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def run_step():
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics["loss"])

        first, median = time_steps(run_step, args.steps)
        rows.append((f"JAX {args.dtype}, {count} {jax.default_backend()} device(s)", args.batch / median,
                     compile_s + first, compile_s))
    return rows


def torch_row(args, clips, targets) -> tuple[str, float, float]:
    import numpy as np
    import torch
    from torchlibrosa.augmentation import SpecAugmentation

    from benchmarks.implementations import torch_device
    from convnext_audio_jax.convert.torch_reference import (
        build_reference,
        normalised_log_mel,
    )
    from convnext_audio_jax.data.audio import INT16_SCALE

    name = args.model
    device = torch_device()  # the GPU where torch has one, so a GPU run compares GPU with GPU
    model = build_reference(name, **({"drop_path_rate": 0.4} if name.startswith("convnext") else {})).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    spec_augment = SpecAugmentation(time_drop_width=64, time_stripes_num=2, freq_drop_width=28, freq_stripes_num=2)
    waveform = torch.from_numpy(clips.astype(np.float32) / INT16_SCALE).to(device)
    target = torch.from_numpy(targets).to(device)
    generator = torch.Generator().manual_seed(0)

    def speed_perturb(x):
        # Nearest-neighbour resampling at a per-example rate in [0.5, 1.5], random crop/pad back to length.
        length = x.shape[1]
        rates = 0.5 + torch.rand(x.shape[0], generator=generator)
        out = torch.zeros_like(x)
        for row, rate in enumerate(rates.tolist()):
            stretched = x[row, (torch.arange(int(np.ceil(length / rate)), device=x.device) * rate).long().clamp(max=length - 1)]
            surplus = stretched.shape[0] - length
            offset = int(torch.randint(0, abs(surplus) + 1, (1,), generator=generator))
            if surplus >= 0:
                out[row] = stretched[offset : offset + length]
            else:
                out[row, offset : offset + stretched.shape[0]] = stretched
        return out

    def run_step():
        logmel = spec_augment(normalised_log_mel(model, speed_perturb(waveform)))
        lambdas = torch.rand(logmel.shape[0] // 2, generator=generator).to(device)
        mixed = logmel[0::2] * lambdas[:, None, None, None] + logmel[1::2] * (1 - lambdas[:, None, None, None])
        mixed_target = target[0::2] * lambdas[:, None] + target[1::2] * (1 - lambdas[:, None])
        logits = model.from_log_mel(mixed)["clipwise_logits"]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, mixed_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    first, median = time_steps(run_step, args.steps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    return (f"PyTorch {torch.__version__} float32 {name} (torch_reference), {where}",
            args.batch / median, first, None)


# The models whose PyTorch reference the training benchmark also steps.
TORCH_TRAINED = ("convnext_tiny", "cnn14", "cnn6")


def random_batch(batch: int, seconds: float):
    """2 × batch int16 clips (mixup pairs) of noise and sparse multi-hot targets."""
    import numpy as np

    from convnext_audio_jax.data.audio import INT16_SCALE

    rng = np.random.default_rng(0)
    samples = int(round(seconds * 32_000))
    clips = (rng.normal(0, 0.1, (2 * batch, samples)).clip(-1, 1) * INT16_SCALE).astype(np.int16)
    targets = (rng.random((2 * batch, 527)) < 0.01).astype(np.float32)
    return clips, targets


def benchmark_train_step(model: str, *, batch: int, dtype: str, repeats: int, overrides: dict | None = None,
                         seconds: float = 10.0, devices: int = 1, with_torch: bool = True) -> list[dict]:
    """Row dicts for benchmarks/run.py: ours on a mesh of ``devices`` devices and, for the full-size models of
    ``TORCH_TRAINED`` in fp32 (``with_torch``), the PyTorch reference's step on the same batch."""
    args = argparse.Namespace(model=model, overrides=overrides, batch=batch, steps=repeats, devices=str(devices),
                              dtype=dtype, seconds=seconds)
    clips, targets = random_batch(batch, args.seconds)
    ours = jax_rows(args, clips, targets)
    if not ours:
        raise ValueError(f"cannot time {devices} device(s): {len(__import__('jax').devices())} available, batch {batch}")
    rows = [("ours", *ours[0][1:])]
    if with_torch and model in TORCH_TRAINED and not overrides and dtype == "float32":
        rows.append(("torch-eager", *torch_row(args, clips, targets)[1:]))
    return [{"implementation": name, "clips_per_s": rate, "first_step_s": first, "compile_s": compile_s}
            for name, rate, first, compile_s in rows]


def main() -> None:
    args = parse_args()
    if args.keep_freed_memory:
        from convnext_audio_jax.runtime import host_memory

        host_memory.keep_freed_memory()
    import jax

    clips, targets = random_batch(args.batch, args.seconds)
    rows = []
    for impl in args.depthwise_impls.split(","):
        args.overrides = {"depthwise_impl": impl} if impl != "auto" else {}
        rows += [(f"{name}, depthwise {impl}", *rest) for name, *rest in jax_rows(args, clips, targets)]
    if not args.no_torch:
        rows.append(torch_row(args, clips, targets))
    print(f"\ntraining step, {args.model}, {args.seconds:g} s clips, batch {args.batch} examples "
          f"({2 * args.batch} clips with mixup), median of {args.steps} steps; {jax.devices()[0].device_kind}")
    print(f"{'implementation':<58} {'clips/s':>9} {'first step s':>13} {'compile s':>10}")
    for name, rate, first, compile_s in rows:
        print(f"{name:<58} {rate:9.2f} {first:13.1f} {'–' if compile_s is None else f'{compile_s:.1f}':>10}")
    if not args.no_torch and rows[:-1]:
        print(f"ours / PyTorch (first row): {rows[0][1] / rows[-1][1]:.2f}x")


if __name__ == "__main__":
    # Simulated devices for the scaling rows on a CPU; set before JAX starts.
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and os.environ.get(
        "JAX_PLATFORMS", "cpu"
    ) == "cpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    main()
