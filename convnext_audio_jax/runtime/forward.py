"""A jitted forward pass sharded over every device, for evaluation, tagging and embeddings.

The batch is split over a one-axis ``("data",)`` mesh and the variables are replicated: each device runs the
model on its own rows (``sharding.per_device``), so the program has no collective at all. Every call runs a
fixed batch size (short batches are zero-padded and the padding is dropped from the results), so a given
waveform length compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convnext_audio_jax.runtime.sharding import (  # noqa: F401  (data_mesh re-exported)
    barrier,
    batch_spec,
    data_mesh,
    jit_forward,
)

# Picks (and may derive) the arrays a forward returns: (variables, model outputs) → dict of arrays.
OutputSelector = Callable[[Mapping[str, Any], Mapping[str, jax.Array]], dict[str, jax.Array]]


def select_probs(variables: Mapping[str, Any], outputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    del variables
    return {"probs": outputs["probs"]}


class ShardedForward:
    """``forward(waveforms)``: (n ≤ batch_size, samples) float32 at the model's sample rate → dict of
    numpy arrays with n rows.

    ``batch_size`` is rounded up to a multiple of the mesh size (each device gets the same share).
    ``select`` picks the outputs to bring back to the host (default: ``probs``)."""

    def __init__(self, model: nn.Module, variables: Mapping[str, Any], batch_size: int, mesh: Mesh | None = None,
                 select: OutputSelector = select_probs):
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
        mesh = mesh or data_mesh()
        self.num_devices = mesh.devices.size
        self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
        replicated = NamedSharding(mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(mesh, batch_spec(mesh))
        self._variables = jax.device_put(variables, replicated)

        def forward(variables, waveforms):
            return select(variables, model.apply(variables, waveforms, train=False))

        self._forward = jit_forward(forward, mesh)
        # A mesh of one process's devices (predict and embed split the work by process) gathers nothing: the
        # other processes run other batches, so a collective here would wait for them forever.
        self._gather = len({device.process_index for device in mesh.devices.flat}) > 1

    def __call__(self, waveforms: np.ndarray) -> dict[str, np.ndarray]:
        waveforms = np.asarray(waveforms, dtype=np.float32)
        rows = waveforms.shape[0]
        if not 0 < rows <= self.batch_size:
            raise ValueError(f"expected 1 to {self.batch_size} waveforms, got {rows}")
        if rows < self.batch_size:
            # Zero rows fill the batch: the model runs in eval mode (running BatchNorm statistics), so the
            # padding cannot change the real rows' outputs.
            padding = np.zeros((self.batch_size - rows, *waveforms.shape[1:]), np.float32)
            waveforms = np.concatenate([waveforms, padding])
        outputs = self._forward(self._variables, jax.device_put(waveforms, self._batch_sharding))
        if self._gather:  # each process holds only its devices' rows: gather every row
            barrier("sharded forward")  # the first call compiles, for longer in one process than gloo waits
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
        return {name: np.asarray(value)[:rows] for name, value in outputs.items()}
