"""One process of the multi-process tests (tests/test_distributed.py, tests/test_training_multiprocess.py): joins
the job described by its flags or environment, computes on a global mesh and prints ``RESULT {json}``, which
`results` reads back. `compute` also runs in one process."""

from __future__ import annotations

import json
import sys

import numpy as np

ROWS, COLUMNS = 64, 6


def global_data() -> tuple[np.ndarray, np.ndarray]:
    integers = np.arange(ROWS * COLUMNS, dtype=np.int32).reshape(ROWS, COLUMNS) - 100
    floats = np.random.default_rng(0).standard_normal((ROWS, COLUMNS)).astype(np.float32)
    return integers, floats


def results(outputs) -> list[dict]:
    """The ``RESULT`` in the stdout of each of a group's ProcessResults (tests/multiprocess.py), in process order."""
    return [json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT "))) for out in outputs]


def compute() -> dict:
    """A jitted reduction over a batch sharded on every device of every process, each process giving its rows."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",), devices=jax.devices())
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    integers, floats = global_data()
    rows = ROWS // jax.process_count()
    local = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    x = jax.make_array_from_process_local_data(sharded, integers[local])
    y = jax.make_array_from_process_local_data(sharded, floats[local])

    @jax.jit
    def reduce(x, y):
        return {"int_sum": jnp.sum(x), "int_column_squares": jnp.sum(x * x, axis=0),
                "float_column_means": jnp.mean(y, axis=0), "float_square_sum": jnp.sum(y * y)}

    @jax.jit
    def rowwise(x, y):  # stays sharded: each device's rows
        return x * 3 + 1, jnp.tanh(y)

    reduced = jax.jit(reduce, out_shardings=replicated)(x, y)
    x3, tanh_y = multihost_utils.process_allgather(rowwise(x, y), tiled=True)
    mine = np.full((2, 3), jax.process_index(), np.int32)
    gathered = multihost_utils.process_allgather(mine, tiled=True)
    stacked = multihost_utils.process_allgather(mine)
    return {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "x_addressable_rows": sorted(int(s.index[0].start or 0) for s in x.addressable_shards),
        **{key: np.asarray(value).tolist() for key, value in reduced.items()},
        "rowwise_int": np.asarray(x3).tolist(), "rowwise_float": np.asarray(tanh_y).tolist(),
        "gathered": np.asarray(gathered).tolist(), "stacked_shape": list(np.shape(stacked)),
    }


def main(argv) -> int:
    from convnext_audio_jax.runtime import distributed

    options = dict(arg[2:].split("=", 1) for arg in argv[1:])
    spec = distributed.initialize(options.get("coordinator"), options.get("num_processes"), options.get("process_id"),
                                  options.get("local_device_ids"), options.get("layout"))
    if "late" in options:  # the last process comes this many seconds late to the first collective
        import time

        import jax

        from convnext_audio_jax.runtime import sharding

        if jax.process_index() == jax.process_count() - 1:
            time.sleep(float(options["late"]))
        sharding.barrier("late process")
    result = compute()
    result["spec"] = None if spec is None else {"layout": spec.layout, "cluster": spec.cluster,
                                                "local_device_ids": spec.local_device_ids}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
