"""Data parallelism: the one-axis ``data`` mesh, and the per-device program over it (``jax.shard_map``) that the
train step, the eval step and the sharded forward run, with what layers inside it need to stay global-batch
exact: sums over every device (BatchNorm's statistics) and per-example random draws of the whole batch.

Written by hand rather than left to jit's sharding propagation because XLA's partitioner gathers the whole batch
onto every device before an FFT (the log-mel front end) and before a custom call (the CPU kernels), and cannot
keep the gradients of several micro-batches unreduced: per device, the only collective of a train step is one
all-reduce of the gradients (plus BatchNorm's per-channel statistics), whatever the batch and accumulation.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax._src import (
    distributed as jax_distributed,  # the client has no public accessor; orbax reads it too
)
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convnext_audio_jax.runtime import xla

AXIS = "data"
# How long a process waits at a barrier for the slowest one (compiling a full-size train step on a loaded host
# takes minutes).
BARRIER_TIMEOUT_S = 1800
_barriers_passed: collections.Counter = collections.Counter()


def data_mesh(devices: list | None = None) -> Mesh:
    """The one-axis mesh named "data" over ``devices`` (default: all, of every process) that training,
    evaluation and inference share.

    The devices are listed in process order (then by id), so ``jax.make_array_from_process_local_data`` puts
    process p's rows in the p-th contiguous block of a global batch: the order the loader's process blocks
    (data/pipeline.py) assume, which makes a multi-process batch the single-process one row for row."""
    devices = sorted(devices or jax.devices(), key=lambda device: (device.process_index, device.id))
    return Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """The batch axis split over every axis of ``mesh`` (a caller's multi-axis mesh works too)."""
    return PartitionSpec(mesh.axis_names)


def per_device(fun: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """``fun`` run on each device's block of its batch-sharded arguments (``jax.shard_map``): inside it, the
    functions below see the mesh's axes as the devices of one global batch."""
    return jax.shard_map(fun, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def jit_forward(forward: Callable, mesh: Mesh) -> Callable:
    """``forward(variables, batch)`` jitted (``xla.jit``) as a per-device program: the variables replicated, the batch
    and every output split by rows over ``mesh``; no collective (the sharded forward and the eval step)."""
    rows = batch_spec(mesh)
    return xla.jit(per_device(forward, mesh, (PartitionSpec(), rows), rows),
                   in_shardings=(NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, rows)),
                   out_shardings=NamedSharding(mesh, rows))


def manual_axes() -> tuple[str, ...]:
    """The mesh axes the code being traced runs per device over (inside :func:`per_device`); () elsewhere."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind == jax.sharding.AxisType.Manual)


def device_count() -> int:
    """How many devices share the global batch of the code being traced (1 outside :func:`per_device`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[name] for name in manual_axes())


def device_index() -> jax.Array | int:
    """This device's block of the global batch (0 outside :func:`per_device`)."""
    axes = manual_axes()
    return jax.lax.axis_index(axes) if axes else 0


def global_sum(x):
    """``x`` (a pytree) summed over the devices of the global batch: one ``psum``, or ``x`` itself outside
    :func:`per_device`."""
    axes = manual_axes()
    return jax.lax.psum(x, axes) if axes else x


def rows_of_global_draw(draw: Callable[[int], Any], rows: int) -> Any:
    """``draw(n)`` is a random draw (an array or a pytree of arrays) with n rows; this device's ``rows`` of the
    draw for the whole global batch. Per-example randomness (a speed, a stripe, a mixing weight, a drop-path
    coin) is then the same for an example whichever device holds it, so a sharded step equals the one-device
    step. Meant for draws of a few values per example (the global draw is computed on every device)."""
    devices = device_count()
    if devices == 1:
        return draw(rows)
    start = device_index() * rows
    return jax.tree.map(lambda whole: jax.lax.dynamic_slice_in_dim(whole, start, rows, axis=0), draw(rows * devices))


def fold_in_device(key: jax.Array) -> jax.Array:
    """``key`` made distinct per device (for element-wise randomness such as dropout masks, too large to draw
    for the whole batch on every device); ``key`` itself outside :func:`per_device`."""
    return jax.random.fold_in(key, device_index()) if manual_axes() else key


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process has reached the barrier ``name``; a no-op in a single-process run.

    Called after host work whose length differs between processes (compiling, reading, writing) and before
    the next cross-process collective. On CPU devices that collective is gloo's, and gloo gives a late process
    only 30 s to join; this barrier goes through the coordinator's key-value service and waits ``timeout_s``.
    Every process passes the same barriers in the same order (a name may repeat)."""
    if jax.process_count() == 1:
        return
    _barriers_passed[name] += 1
    jax_distributed.global_state.client.wait_at_barrier(f"{name}#{_barriers_passed[name]}",
                                                        timeout_in_ms=int(timeout_s * 1000))
