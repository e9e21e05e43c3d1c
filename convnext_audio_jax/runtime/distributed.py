"""Joining a multi-process JAX job: flags, environment variables or JAX's own cluster detection.

Three ways to describe the job, in this order of precedence for each value:
1. arguments (``train.py --coordinator HOST:PORT --num_processes N --process_id I [--local_device_ids 0,1]``);
2. environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``,
   ``JAX_LOCAL_DEVICE_IDS`` (JAX itself reads only the first and the last; the two others are this project's);
3. JAX's cluster detection (``jax._src.clusters``: SLURM, Open MPI, Kubernetes, Cloud TPU / GKE TPU).

Two layouts: ``per_host`` (one process per host drives every local device) and ``per_device`` (one process per
accelerator, pinned to the device numbered by its local rank). Under SLURM and Open MPI, JAX alone always pins
each process to device ``local rank``, which with one process per host would leave all GPUs but GPU 0 idle;
here the layout is taken from ``--layout`` / ``JAX_PROCESS_LAYOUT``, or, with ``auto``, from the number of
tasks the launcher put on this node (1: per_host, more: per_device).

Everything is resolved and checked (`resolve`) before jax is called, so a wrong or partial setting is one
line naming the flag or variable; `initialize` then calls ``jax.distributed.initialize`` with every value
given and JAX's detection switched off, so JAX cannot pick something else. ``JAX_COORDINATOR_PORT`` (the port
of a detected coordinator) is honoured as JAX does; ``JAX_COORDINATOR_BIND_ADDRESS`` and
``JAX_PARTITION_INDEX`` are left to JAX. A task bound to a single GPU (``CUDA_VISIBLE_DEVICES`` with one entry)
sees it as its device 0 and is pinned to that.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence

from convnext_audio_jax.runtime.errors import UserError

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "per_host", "per_device")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
ENV_LAYOUT = "JAX_PROCESS_LAYOUT"
ENV_COORDINATOR_PORT = "JAX_COORDINATOR_PORT"  # JAX's: the port for a coordinator its cluster detection finds


class DistributedConfigError(UserError):
    """A multi-process setting that cannot work; the message names the flag or variable."""


@dataclasses.dataclass(frozen=True)
class JoinSpec:
    """What this process passes to ``jax.distributed.initialize``.

    local_device_ids: the local devices this process drives; None: every local device (per_host).
    cluster: where the values came from ("flags/env" or a JAX cluster name: "SlurmCluster", ...).
    """

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    layout: str
    cluster: str

    def initialize_kwargs(self) -> dict:
        """Keyword arguments of ``jax.distributed.initialize``; detection off so nothing is overridden."""
        return {
            "coordinator_address": self.coordinator_address,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
            "local_device_ids": None if self.local_device_ids is None else list(self.local_device_ids),
            "cluster_detection_method": "deactivate",
        }


def _int(value, name: str, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise DistributedConfigError(f"{name} must be an integer; got {value!r}") from None
    if number < minimum:
        raise DistributedConfigError(f"{name} must be >= {minimum}; got {number}")
    return number


def _device_ids(value, name: str) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or any(str(item).strip() == "" for item in items):
        raise DistributedConfigError(f"{name} must be comma-separated device numbers like 0,1; got {value!r}")
    ids = tuple(_int(item, name, 0) for item in items)
    if len(set(ids)) != len(ids):
        raise DistributedConfigError(f"{name} lists a device twice: {value!r}")
    return ids


def check_coordinator(address: str, name: str) -> str:
    """``address`` if it is HOST:PORT (IPv6 as [ADDR]:PORT) with a port in 1..65535."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d+)", address.strip())
    if not match:
        raise DistributedConfigError(f"{name} must be HOST:PORT (e.g. node001:12345); got {address!r}")
    if not 1 <= int(match.group(2)) <= 65535:
        raise DistributedConfigError(f"{name} port must be in 1..65535; got {address!r}")
    return address.strip()


def detect_cluster():
    """The JAX cluster class (``jax._src.clusters``) whose environment is present, or None. Opt-in-only
    methods (mpi4py) are left out, as ``jax.distributed.initialize()`` does by default."""
    from jax._src import clusters

    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def _expand_tasks_per_node(value: str) -> list[int]:
    """SLURM's compressed per-node task counts, e.g. "8(x2),4" → [8, 8, 4]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise DistributedConfigError(f"cannot read SLURM tasks per node {value!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def local_task_count(cluster_name: str | None, environ: Mapping[str, str]) -> tuple[int, str] | None:
    """(processes the launcher started on this node, the variable it came from), or None when unknown."""
    if cluster_name == "SlurmCluster":
        for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            if key in environ:
                counts = _expand_tasks_per_node(environ[key])
                node = _int(environ.get("SLURM_NODEID", "0"), "SLURM_NODEID", 0)
                if node >= len(counts):
                    raise DistributedConfigError(f"SLURM_NODEID {node} is past {key}={environ[key]!r}")
                return counts[node], f"{key}={environ[key]}"
        if "SLURM_NTASKS_PER_NODE" in environ:
            return _int(environ["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE", 1), "SLURM_NTASKS_PER_NODE"
    if cluster_name == "OmpiCluster" and "OMPI_COMM_WORLD_LOCAL_SIZE" in environ:
        key = "OMPI_COMM_WORLD_LOCAL_SIZE"
        return _int(environ[key], key, 1), key
    return None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            local_device_ids: str | Sequence[int] | None = None, layout: str | None = None,
            environ: Mapping[str, str] | None = None, cluster=...) -> JoinSpec | None:
    """The join settings for this process, or None for a single-process run. Calls nothing in jax but the
    cluster detection (``cluster``: a ``jax._src.clusters`` class or None; default: detected). ``environ``
    (default os.environ) is where the JAX_* variables, task counts and visible devices are read; JAX's cluster
    classes always read os.environ.

    Raises DistributedConfigError (one line naming the flag/variable) for a partial or inconsistent setting.
    """
    environ = os.environ if environ is None else environ

    def pick(value, flag: str, env_key: str):
        if value is not None and value != "" and value != []:
            return value, flag
        if environ.get(env_key, "").strip():
            return environ[env_key].strip(), env_key
        return None, None

    coordinator, coordinator_from = pick(coordinator, "--coordinator", ENV_COORDINATOR)
    num_processes, num_from = pick(num_processes, "--num_processes", ENV_NUM_PROCESSES)
    process_id, id_from = pick(process_id, "--process_id", ENV_PROCESS_ID)
    device_ids, devices_from = pick(local_device_ids, "--local_device_ids", ENV_LOCAL_DEVICE_IDS)
    layout, layout_from = pick(layout, "--layout", ENV_LAYOUT)
    layout = layout or "auto"
    if layout not in LAYOUTS:
        raise DistributedConfigError(f"{layout_from} must be one of {', '.join(LAYOUTS)}; got {layout!r}")

    if cluster is ...:
        try:
            cluster = detect_cluster()
        except Exception as error:  # e.g. a Kubernetes pod whose API cannot be reached
            raise DistributedConfigError(f"cluster detection failed: {type(error).__name__}: {error}") from None
    cluster_name = None if cluster is None else cluster.__name__
    explicit = [source for source in (coordinator_from, num_from, id_from) if source]
    if not explicit and cluster is None:
        if devices_from or layout_from:
            logger.info("%s ignored: no multi-process job is configured", devices_from or layout_from)
        return None

    if cluster is not None:  # fill what was not given, as jax.distributed.initialize() would
        detected = f"{cluster_name} detection"
        try:
            if coordinator is None:
                port = environ.get(ENV_COORDINATOR_PORT)
                coordinator = cluster.get_coordinator_address(timeout_secs=None, override_coordinator_port=port)
                coordinator_from = detected
            if num_processes is None:
                num_processes, num_from = cluster.get_process_count(), detected
            if process_id is None:
                process_id, id_from = cluster.get_process_id(), detected
        except Exception as error:  # a variable of the cluster missing or malformed
            raise DistributedConfigError(f"{detected} failed: {type(error).__name__}: {error}") from None
    given = ", ".join(explicit) or f"a {cluster_name} environment"
    if coordinator is None:
        raise DistributedConfigError(
            f"multi-process setup ({given}) lacks the coordinator: pass --coordinator HOST:PORT or set {ENV_COORDINATOR}")
    if num_processes is None:
        raise DistributedConfigError(
            f"multi-process setup ({given}) lacks the process count: pass --num_processes N or set {ENV_NUM_PROCESSES}")
    if process_id is None:
        raise DistributedConfigError(
            f"multi-process setup ({given}) lacks this process's index: pass --process_id I or set {ENV_PROCESS_ID}")
    coordinator = check_coordinator(str(coordinator), coordinator_from)
    num_processes = _int(num_processes, num_from, 1)
    process_id = _int(process_id, id_from, 0)
    if process_id >= num_processes:
        raise DistributedConfigError(
            f"{id_from} {process_id} must be below {num_from} {num_processes} "
            f"(processes are numbered 0..{num_processes - 1})")
    if num_processes == 1:
        logger.info("a job of one process: no distributed runtime needed")
        return None

    from jax._src import cloud_tpu_init

    local_rank = None
    if cluster is not None and not cloud_tpu_init.running_in_cloud_tpu_vm:  # JAX never pins TPU processes
        try:
            local_rank = cluster.get_local_process_id()
        except Exception as error:
            raise DistributedConfigError(f"{cluster_name} local rank: {type(error).__name__}: {error}") from None
    tasks_here = local_task_count(cluster_name, environ)
    if device_ids is not None:
        device_ids = _device_ids(device_ids, devices_from)
        if layout == "per_host":
            raise DistributedConfigError(
                f"layout per_host drives every local device, but {devices_from} restricts them to {list(device_ids)}")
        if layout == "per_device" and len(device_ids) != 1:
            raise DistributedConfigError(
                f"layout per_device drives one device per process, but {devices_from} lists {list(device_ids)}")
        return JoinSpec(coordinator, num_processes, process_id, device_ids,
                        "per_device" if len(device_ids) == 1 else "per_host", cluster_name or "flags/env")
    if layout == "auto":
        layout = "per_device" if local_rank is not None and (tasks_here is None or tasks_here[0] > 1) else "per_host"
    if layout == "per_host":
        if tasks_here is not None and tasks_here[0] > 1:
            raise DistributedConfigError(
                f"layout per_host needs one process per node, but {cluster_name} started {tasks_here[0]} here "
                f"({tasks_here[1]}); launch one task per node or use layout per_device")
        return JoinSpec(coordinator, num_processes, process_id, None, "per_host", cluster_name or "flags/env")
    visible = single_visible_device(environ)
    if visible is not None:  # the launcher bound one GPU to this task (srun --gpus-per-task=1): it is device 0
        return JoinSpec(coordinator, num_processes, process_id, (0,), "per_device", cluster_name or "flags/env")
    if local_rank is None:
        raise DistributedConfigError(
            f"layout per_device needs this process's device: pass --local_device_ids or set {ENV_LOCAL_DEVICE_IDS} "
            f"(no SLURM / Open MPI local rank found)")
    return JoinSpec(coordinator, num_processes, process_id, (int(local_rank),), "per_device", cluster_name)


def single_visible_device(environ: Mapping[str, str]) -> str | None:
    """The variable restricting this process to exactly one GPU (CUDA_VISIBLE_DEVICES=3 for a task bound to
    GPU 3), or None. Such a process sees that GPU as its device 0, so pinning it to its local rank would fail."""
    for key in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        devices = [d for d in environ.get(key, "").split(",") if d.strip()]
        if len(devices) == 1:
            return key
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: str | Sequence[int] | None = None, layout: str | None = None) -> JoinSpec | None:
    """Join the job described by the arguments, the environment or the cluster (see the module docstring)
    before anything else touches jax; a no-op returning None for a single-process run. Raises
    DistributedConfigError for a partial or inconsistent setting, before calling jax."""
    spec = resolve(coordinator, num_processes, process_id, local_device_ids, layout)
    if spec is None:
        return None
    import jax

    # Cross-process collectives between CPU devices (tests, CPU-only hosts) need an implementation; gloo
    # ships with jaxlib. Accelerator collectives (NCCL, ICI) are unaffected.
    if jax.config.jax_cpu_collectives_implementation in (None, "none", "gloo"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("joining %s as process %d of %d (%s, %s, local devices %s)", spec.coordinator_address, spec.process_id,
                spec.num_processes, spec.cluster, spec.layout,
                "all" if spec.local_device_ids is None else list(spec.local_device_ids))
    jax.distributed.initialize(**spec.initialize_kwargs())
    return spec
