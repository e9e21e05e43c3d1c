"""convnext_audio_jax.runtime.distributed: flags/env/cluster parsing (every error), SLURM and Open MPI simulated, and
real 2-process jobs on localhost (gloo collectives between simulated CPU devices)."""

from __future__ import annotations

import inspect
import os
import sys

import jax
import numpy as np
import pytest
from jax._src import clusters

from convnext_audio_jax.runtime import distributed
from convnext_audio_jax.runtime.distributed import DistributedConfigError, resolve

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker  # noqa: E402
from multiprocess import process_env, run_group, run_jax_processes  # noqa: E402

CLUSTER_PREFIXES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_",
                    "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_", "TPU_WORKER_HOSTNAMES", "MEGASCALE_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No cluster of the machine running the tests leaks in; each test sets what it simulates."""
    for key in list(os.environ):
        if key.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(key)


def set_env(monkeypatch, **values):
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


# ------------------------------------------------------------------------------------------ flags and env


def test_nothing_set_is_single_process():
    assert resolve() is None


def test_flags():
    spec = resolve("127.0.0.1:1234", 2, 1)
    assert spec == distributed.JoinSpec("127.0.0.1:1234", 2, 1, None, "per_host", "flags/env")
    assert spec.initialize_kwargs() == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
                                        "local_device_ids": None, "cluster_detection_method": "deactivate"}


def test_env(monkeypatch):
    set_env(monkeypatch, JAX_COORDINATOR_ADDRESS="host-a:9000", JAX_NUM_PROCESSES=4, JAX_PROCESS_ID=3)
    assert resolve() == distributed.JoinSpec("host-a:9000", 4, 3, None, "per_host", "flags/env")


def test_flags_override_env(monkeypatch):
    set_env(monkeypatch, JAX_COORDINATOR_ADDRESS="host-a:9000", JAX_NUM_PROCESSES=4, JAX_PROCESS_ID=3)
    spec = resolve("host-b:9001", 8, 5)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("host-b:9001", 8, 5)


def test_ipv6_coordinator_and_explicit_devices(monkeypatch):
    spec = resolve("[::1]:8476", 2, 0, "2,3")
    assert spec.coordinator_address == "[::1]:8476" and spec.local_device_ids == (2, 3)
    set_env(monkeypatch, JAX_LOCAL_DEVICE_IDS="5")
    spec = resolve("[::1]:8476", 2, 0, layout="per_device")
    assert spec.local_device_ids == (5,) and spec.layout == "per_device"
    assert spec.initialize_kwargs()["local_device_ids"] == [5]


def test_one_process_needs_no_runtime():
    assert resolve("127.0.0.1:1234", 1, 0) is None


@pytest.mark.parametrize("kwargs, env, message", [
    ({"coordinator": "h:1"}, {}, "multi-process setup (--coordinator) lacks the process count: pass --num_processes N or set JAX_NUM_PROCESSES"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     "multi-process setup (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES) lacks this process's index: pass --process_id I or set JAX_PROCESS_ID"),
    ({"num_processes": 2, "process_id": 0}, {}, "lacks the coordinator: pass --coordinator HOST:PORT or set JAX_COORDINATOR_ADDRESS"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {},
     "--process_id 2 must be below --num_processes 2 (processes are numbered 0..1)"),
    ({"coordinator": "node001", "num_processes": 2, "process_id": 0}, {}, "--coordinator must be HOST:PORT (e.g. node001:12345); got 'node001'"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "node001:", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS must be HOST:PORT"),
    ({"coordinator": "h:70000", "num_processes": 2, "process_id": 0}, {}, "--coordinator port must be in 1..65535; got 'h:70000'"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES must be an integer; got 'two'"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, {}, "--num_processes must be >= 1; got 0"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": -1}, {}, "--process_id must be >= 0; got -1"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0, "layout": "per_node"}, {},
     "--layout must be one of auto, per_host, per_device; got 'per_node'"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0}, {"JAX_PROCESS_LAYOUT": "host"},
     "JAX_PROCESS_LAYOUT must be one of auto, per_host, per_device; got 'host'"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0, "local_device_ids": "0,,1"}, {},
     "--local_device_ids must be comma-separated device numbers like 0,1; got '0,,1'"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0}, {"JAX_LOCAL_DEVICE_IDS": "1,1"},
     "JAX_LOCAL_DEVICE_IDS lists a device twice: '1,1'"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0, "local_device_ids": ["0"], "layout": "per_host"}, {},
     "layout per_host drives every local device, but --local_device_ids restricts them to [0]"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0, "local_device_ids": [0, 1], "layout": "per_device"}, {},
     "layout per_device drives one device per process, but --local_device_ids lists [0, 1]"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0, "layout": "per_device"}, {},
     "layout per_device needs this process's device: pass --local_device_ids or set JAX_LOCAL_DEVICE_IDS"),
])
def test_errors(monkeypatch, kwargs, env, message):
    set_env(monkeypatch, **env)
    with pytest.raises(DistributedConfigError) as error:
        resolve(**kwargs)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_devices_or_layout_alone_are_ignored(monkeypatch):
    set_env(monkeypatch, JAX_LOCAL_DEVICE_IDS="0", JAX_PROCESS_LAYOUT="per_device")
    assert resolve() is None


# ---------------------------------------------------------------------------------- SLURM and Open MPI


def jax_detection():
    """What jax.distributed.initialize() alone would pass (its own cluster detection)."""
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, None)


def slurm(monkeypatch, tasks_per_node: int, nodes: int, proc: int, **extra):
    set_env(monkeypatch, SLURM_JOB_ID=4242, SLURM_STEP_NODELIST="gpu[007-008]", SLURM_STEP_NUM_NODES=nodes,
            SLURM_NTASKS=tasks_per_node * nodes, SLURM_PROCID=proc, SLURM_LOCALID=proc % tasks_per_node,
            SLURM_NODEID=proc // tasks_per_node, SLURM_STEP_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})", **extra)


def test_slurm_one_process_per_gpu(monkeypatch):
    slurm(monkeypatch, tasks_per_node=8, nodes=2, proc=11)
    spec = resolve()
    port = 4242 % 4096 + 65535 - 4096 + 1  # JAX's port for a SLURM job id
    assert spec == distributed.JoinSpec(f"gpu007:{port}", 16, 11, (3,), "per_device", "SlurmCluster")
    assert jax_detection() == (spec.coordinator_address, 16, 11, [3])  # what JAX alone does here


def test_slurm_one_process_per_node_drives_every_gpu(monkeypatch):
    slurm(monkeypatch, tasks_per_node=1, nodes=2, proc=1)
    spec = resolve()
    assert (spec.num_processes, spec.process_id, spec.local_device_ids, spec.layout) == (2, 1, None, "per_host")
    assert jax_detection()[3] == [0]  # JAX alone would pin this process to GPU 0: the bug this module avoids


def test_slurm_layout_checks(monkeypatch):
    slurm(monkeypatch, tasks_per_node=8, nodes=2, proc=3, JAX_PROCESS_LAYOUT="per_host")
    with pytest.raises(DistributedConfigError, match=r"layout per_host needs one process per node, but SlurmCluster "
                                                     r"started 8 here \(SLURM_STEP_TASKS_PER_NODE=8\(x2\)\)"):
        resolve()
    assert resolve(layout="per_device").local_device_ids == (3,)


def test_slurm_one_gpu_bound_per_task(monkeypatch):
    """srun --gpus-per-task=1: each task sees only its GPU, as device 0, whatever its local rank."""
    slurm(monkeypatch, tasks_per_node=8, nodes=2, proc=13, CUDA_VISIBLE_DEVICES=5)
    assert resolve().local_device_ids == (0,)
    assert jax_detection()[3] == [5]  # JAX alone would ask for device 5 of a process that has one device
    slurm(monkeypatch, tasks_per_node=8, nodes=2, proc=13, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert resolve().local_device_ids == (5,)


def test_slurm_uneven_tasks_and_fallback_variables(monkeypatch):
    slurm(monkeypatch, tasks_per_node=1, nodes=3, proc=2)
    set_env(monkeypatch, SLURM_STEP_TASKS_PER_NODE="2,1(x2)", SLURM_NODEID=2, SLURM_LOCALID=0)
    assert resolve().layout == "per_host"  # node 2 runs one task
    monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE")
    set_env(monkeypatch, SLURM_TASKS_PER_NODE="4(x3)", SLURM_LOCALID=1)
    assert resolve().local_device_ids == (1,)
    set_env(monkeypatch, SLURM_TASKS_PER_NODE="4(y3)")
    with pytest.raises(DistributedConfigError, match=r"cannot read SLURM tasks per node '4\(y3\)'"):
        resolve()


def test_slurm_port_coordinator_and_single_task(monkeypatch):
    slurm(monkeypatch, tasks_per_node=1, nodes=2, proc=0, JAX_COORDINATOR_PORT=12345)
    assert resolve().coordinator_address == "gpu007:12345"
    assert resolve(coordinator="10.0.0.5:2000").coordinator_address == "10.0.0.5:2000"
    slurm(monkeypatch, tasks_per_node=1, nodes=1, proc=0)
    assert resolve() is None  # sbatch with one task: nothing to join


def test_broken_cluster_variables(monkeypatch):
    slurm(monkeypatch, tasks_per_node=1, nodes=2, proc=0)
    set_env(monkeypatch, SLURM_NTASKS="two")
    with pytest.raises(DistributedConfigError, match="^SlurmCluster detection failed: ValueError: invalid literal"):
        resolve()
    slurm(monkeypatch, tasks_per_node=1, nodes=2, proc=0)
    set_env(monkeypatch, SLURM_NODEID=5)
    with pytest.raises(DistributedConfigError, match=r"SLURM_NODEID 5 is past SLURM_STEP_TASKS_PER_NODE='1\(x2\)'"):
        resolve()


def test_open_mpi(monkeypatch):
    set_env(monkeypatch, OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
            OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_RANK=3, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_LOCAL_SIZE=2)
    spec = resolve()
    port = (1531576320 // 4096) % 4096 + 65535 - 4096 + 1
    assert spec == distributed.JoinSpec(f"10.96.0.1:{port}", 4, 3, (1,), "per_device", "OmpiCluster")
    assert jax_detection() == (spec.coordinator_address, 4, 3, [1])
    set_env(monkeypatch, OMPI_COMM_WORLD_LOCAL_SIZE=1, OMPI_COMM_WORLD_LOCAL_RANK=0)
    assert resolve().local_device_ids is None


# ------------------------------------------------------------------------------------------- initialize


def test_initialize_calls_jax_once_with_the_spec(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.initialize() is None and calls == []  # single process: jax untouched
    with pytest.raises(DistributedConfigError):
        distributed.initialize("h:1", 2, 5)
    assert calls == []  # the error comes before jax is called
    spec = distributed.initialize("127.0.0.1:1234", 2, 1, ["0"], "per_device")
    assert calls == [spec.initialize_kwargs()] and calls[0]["local_device_ids"] == [0]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


# ------------------------------------------------------------------------------------ private JAX APIs


def _parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]


def test_jax_cluster_detection_is_where_distributed_reads_it():
    """distributed.detect_cluster and resolve use JAX's cluster detection, which has no public API
    (jax.distributed.initialize runs it only while joining): jax._src.clusters.ClusterEnv._cluster_types, each with
    opt_in_only_method, is_env_present(), get_coordinator_address(timeout_secs, override_coordinator_port),
    get_process_count(), get_process_id() and get_local_process_id(). A JAX upgrade that moves them fails here, not in
    a user's multi-process job."""
    types = clusters.ClusterEnv._cluster_types
    assert {"SlurmCluster", "OmpiCluster"} <= {cluster.__name__ for cluster in types}
    for cluster in types:
        assert isinstance(cluster.opt_in_only_method, bool), cluster
        assert _parameters(cluster.is_env_present) == [], cluster
        assert _parameters(cluster.get_coordinator_address) == ["timeout_secs", "override_coordinator_port"], cluster
        for method in ("get_process_count", "get_process_id", "get_local_process_id"):
            assert _parameters(getattr(cluster, method)) == [], (cluster, method)


def test_jax_cloud_tpu_flag_is_where_distributed_reads_it():
    """distributed.resolve asks whether it runs in a Cloud TPU VM (where JAX never pins a process to devices) as JAX
    does, with no public API for it: jax._src.cloud_tpu_init.running_in_cloud_tpu_vm, a bool."""
    from jax._src import cloud_tpu_init

    assert isinstance(cloud_tpu_init.running_in_cloud_tpu_vm, bool)


def test_jax_distributed_client_is_where_the_barrier_reads_it():
    """sharding.barrier waits at the coordinator's key-value service through JAX's distributed client, which has no
    public accessor (orbax reads the same attribute): jax._src.distributed.global_state.client (None until
    jax.distributed.initialize), a jaxlib DistributedRuntimeClient with wait_at_barrier(barrier_id, timeout_in_ms).
    A JAX upgrade that moves it fails here, not at the first barrier of a multi-process run."""
    from jax._src import distributed as jax_distributed
    from jax._src.lib import _jax

    assert hasattr(jax_distributed.global_state, "client")
    doc = _jax.DistributedRuntimeClient.wait_at_barrier.__doc__
    assert "wait_at_barrier(self, barrier_id: str, timeout_in_ms: int" in doc, doc


# ------------------------------------------------------------------------------------- real processes


@pytest.mark.parametrize("use_flags", [False, True], ids=["env", "flags"])
def test_two_processes_equal_one(use_flags):
    """2 processes × 4 devices: the global mesh, a jitted sharded reduction over per-process data and
    process_allgather give what 1 process × 8 devices gives (integers exactly; float sums in a different
    order, so to float32 rounding)."""
    first, second = distributed_worker.results(run_jax_processes(["tests/distributed_worker.py"], 2, 4, timeout=120, use_flags=use_flags))
    single = distributed_worker.compute()
    assert single["device_count"] == 8 and single["process_count"] == 1
    for index, result in enumerate((first, second)):
        assert (result["process_index"], result["process_count"]) == (index, 2)
        assert (result["device_count"], result["local_device_count"]) == (8, 4)
        assert result["x_addressable_rows"] == [32 * index + 8 * k for k in range(4)]
        assert result["spec"] == {"layout": "per_host", "cluster": "flags/env", "local_device_ids": None}
        for key in ("int_sum", "int_column_squares", "rowwise_int"):
            assert result[key] == single[key], key
        for key in ("float_column_means", "float_square_sum", "rowwise_float"):
            np.testing.assert_allclose(result[key], single[key], rtol=1e-6, atol=1e-7, err_msg=key)
        assert result["gathered"] == [[0] * 3] * 2 + [[1] * 3] * 2
        assert result["stacked_shape"] == [2, 2, 3]
    integers, floats = distributed_worker.global_data()
    assert first["int_sum"] == int(integers.sum())
    np.testing.assert_allclose(first["float_square_sum"], float((floats.astype(np.float64) ** 2).sum()), rtol=1e-5)


def test_one_device_per_process():
    """per_device layout: 2 processes, each pinned to one of its CPU devices, form a 2-device mesh."""
    first, second = distributed_worker.results(run_jax_processes(["tests/distributed_worker.py"], 2, 1, timeout=120,
                                              extra_env={"JAX_PROCESS_LAYOUT": "per_device", "JAX_LOCAL_DEVICE_IDS": "0"}))
    for index, result in enumerate((first, second)):
        assert (result["device_count"], result["local_device_count"], result["process_index"]) == (2, 1, index)
        assert result["spec"] == {"layout": "per_device", "cluster": "flags/env", "local_device_ids": [0]}
    integers, _ = distributed_worker.global_data()
    assert first["int_sum"] == second["int_sum"] == int(integers.sum())


def test_train_py_bad_setting_is_one_line(tmp_path):
    command = [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
               "--coordinator=localhost", "--num_processes=2", "--process_id=0"]
    (result,) = run_group([command], [process_env(1)], timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "train.py: error: --coordinator must be HOST:PORT (e.g. node001:12345); got 'localhost'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_harness_kills_the_group_when_one_process_fails():
    """A failed process ends the group at once: its peer (which would wait for it) is killed, and every
    output is in the error."""
    import time

    from multiprocess import ProcessGroupError

    sleeper = [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(600)"]
    failing = [sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit('process 1 gave up')"]
    start = time.monotonic()
    with pytest.raises(ProcessGroupError) as error:
        run_group([sleeper, failing], [process_env(1)] * 2, timeout=120)
    assert time.monotonic() - start < 60
    message = str(error.value)
    assert "a process failed" in message and "process 1 gave up" in message and "waiting" in message
    results = run_group([sleeper, failing], [process_env(1)] * 2, timeout=120, check=False)
    assert results[0].returncode is None and results[1].returncode == 1  # None: killed by the harness
    (late,) = run_group([sleeper], [process_env(1)], timeout=1, check=False)
    assert late.returncode is None and late.stdout == "waiting\n"


# train.py and `convnext-audio evaluate` over 2 processes against 1, and a process 40 s late meeting the others at
# sharding.barrier: tests/test_training_multiprocess.py.
