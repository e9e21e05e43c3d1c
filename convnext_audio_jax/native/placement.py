"""Where a compiled kernel's call runs: on the CPU the FFI call, lowered for another platform its XLA form
(:mod:`.xla_forms`), and under a mesh set for tracing on each device's own rows (``shard_map``, the output split the
same way, or one ``psum`` for a sum). The kernels themselves are the package's functions (``native.conv_forward``,
...); this is what they share."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from convnext_audio_jax.runtime import sharding


def matmul_call(target: str, dtype, x: jax.Array, w: jax.Array, bias: jax.Array | None, gelu: bool) -> jax.Array:
    features = w.shape[1]

    def call(x, w, bias):
        rows = x.reshape(-1, x.shape[-1])
        out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], features), dtype),
                               vmap_method="sequential")(rows, w, bias, gelu=bool(gelu))
        return out.reshape(*x.shape[:-1], features)

    x, w = x.astype(dtype), w.astype(dtype)
    bias = jnp.zeros((features,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    return per_device_rows(call, x, w, bias)


def cpu_or_xla(kernel: Callable, xla_form: Callable, *operands: jax.Array):
    """``kernel(*operands)`` (the compiled kernel's call) where the computation is lowered for the CPU, its XLA form
    (:mod:`.xla_forms`) where it is lowered for another platform: a model traced on a CPU host and exported for, or
    run on, a GPU holds no custom call of ours. Lowered for the CPU alone, only the kernel's branch is lowered."""
    return jax.lax.platform_dependent(*operands, cpu=kernel, default=xla_form)


def _batch_split_mesh(batch: int):
    """The mesh set for tracing when the batch splits evenly over all of it, else None; None too inside a
    per-device program (``sharding.per_device``), whose rows are already this device's own."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batch % mesh.size or sharding.manual_axes():
        return None
    return mesh


def rows_per_device(batch: int) -> int:
    """The rows of a batch of ``batch`` each device's kernel call gets: split over the mesh set for tracing where
    it splits evenly (:func:`per_device_rows`), else all."""
    mesh = _batch_split_mesh(batch)
    return batch if mesh is None else batch // mesh.size


def per_device_rows(call, x: jax.Array, *whole: jax.Array) -> jax.Array:
    """``call(x, *whole)``; under a mesh set for tracing, on each device's rows of ``x`` (split along its first axis)
    with ``whole`` replicated, the output split the same way (no collective)."""
    mesh = _batch_split_mesh(x.shape[0])
    if mesh is None:
        return call(x, *whole)
    rows = PartitionSpec(mesh.axis_names)
    return jax.shard_map(call, mesh=mesh, in_specs=(rows, *(PartitionSpec() for _ in whole)), out_specs=rows,
                         check_vma=False)(x, *whole)


def output_size(size: int, pads: tuple[int, int], kernel: int) -> int:
    return size + pads[0] + pads[1] - kernel + 1


def per_device_sum(call, x: jax.Array, dy: jax.Array, *whole: jax.Array):
    """``call(x, dy, *whole)``, a sum over the rows of ``x`` and ``dy``; under a mesh set for tracing, each device's
    rows (split along the first axis) summed on it with ``whole`` replicated, then one ``psum``."""
    mesh = _batch_split_mesh(x.shape[0]) if x.ndim > 1 else None
    if mesh is None:
        return call(x, dy, *whole)
    rows = PartitionSpec(mesh.axis_names)

    def local(*args):
        return jax.lax.psum(call(*args), mesh.axis_names)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, *(PartitionSpec() for _ in whole)),
                         out_specs=PartitionSpec(), check_vma=False)(x, dy, *whole)
