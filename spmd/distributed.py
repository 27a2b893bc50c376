"""Start-up on JAX's multi-controller runtime (`jax.distributed`): one program per host.

`initialize()` runs before JAX starts its backend, in every `spmd` command that runs JAX.
It connects this process to the others, found in this order:
1. `SPMD_COORDINATOR` (host:port of process 0), `SPMD_NUM_PROCESSES` and `SPMD_PROCESS_ID`,
   as set by `spmd launch` or by hand;
2. a cluster that JAX detects itself (Slurm, Open MPI, Cloud TPU, Kubernetes);
3. neither: a plain single-process run, and `initialize()` does nothing.

After it, `jax.devices()` lists every process's devices, and one jitted program runs across
all of them: each process feeds only its own rows of a batch, and only the main process
prints and writes files (`is_main_process`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping

import jax
import numpy as np

from spmd.errors import SpmdError

ENV_COORDINATOR = "SPMD_COORDINATOR"
ENV_NUM_PROCESSES = "SPMD_NUM_PROCESSES"
ENV_PROCESS_ID = "SPMD_PROCESS_ID"
# Set by `spmd launch` alone: its processes take their device count from it, not --devices.
ENV_DEVICES_PER_PROCESS = "SPMD_DEVICES_PER_PROCESS"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a job of `num_processes` processes."""

    coordinator: str  # host:port of the coordinator service, run by process 0
    num_processes: int
    process_id: int

    def __post_init__(self):
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SpmdError(
                f"{ENV_COORDINATOR}={self.coordinator!r} must look like host:port, "
                "e.g. 10.0.0.1:1234"
            )
        if self.num_processes < 1:
            raise SpmdError(f"{ENV_NUM_PROCESSES}={self.num_processes} must be positive")
        if not 0 <= self.process_id < self.num_processes:
            raise SpmdError(
                f"{ENV_PROCESS_ID}={self.process_id} must be in 0..{self.num_processes - 1}"
            )

    @property
    def host(self) -> str:
        return self.coordinator.rpartition(":")[0].strip("[]")

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def group_from_env(env: Mapping[str, str] = os.environ) -> ProcessGroup | None:
    """The group the SPMD_* variables describe, or None if none of them is set."""
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    given = [n for n in names if env.get(n)]
    if not given:
        return None
    if len(given) < len(names):
        missing = ", ".join(n for n in names if n not in given)
        raise SpmdError(f"{', '.join(given)} is set but {missing} is not; set all three")
    return ProcessGroup(
        env[ENV_COORDINATOR].strip(),
        _env_int(env, ENV_NUM_PROCESSES),
        _env_int(env, ENV_PROCESS_ID),
    )


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise SpmdError(f"{name}={env[name]!r} is not an integer") from None


def bind_address(group: ProcessGroup, env: Mapping[str, str] = os.environ) -> str | None:
    """Where process 0's coordinator listens; None leaves JAX's default (every interface).

    A loopback coordinator only ever serves this machine, so it listens on loopback alone;
    JAX_COORDINATOR_BIND_ADDRESS still wins, for those who ask for something else.
    """
    if env.get("JAX_COORDINATOR_BIND_ADDRESS") or not group.is_loopback:
        return None
    return group.coordinator


def detected_cluster() -> str | None:
    """The name of a multi-process cluster that JAX would join by itself, if any."""
    cluster = _cluster_env()
    return cluster.__name__ if cluster else None


def _cluster_env():
    """JAX's description of the multi-process cluster around this process, or None.

    A cluster of one process (an interactive Slurm shell, a single TPU VM) is a plain run:
    joining it would only pin the process to one local device.
    """
    try:  # JAX's cluster registry has no public API; without it, there is no auto-detection.
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return None
    for env in ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        return env if env.get_process_count() > 1 else None
    return None


def launched_processes() -> int | None:
    """The process count of the `spmd launch` job this process has joined; None if it has
    joined none (a plain run, or a command such as `explain` that never joins)."""
    if not jax.distributed.is_initialized() or not os.environ.get(ENV_DEVICES_PER_PROCESS):
        return None
    group = group_from_env()
    return group.num_processes if group else None


def job_rank() -> int:
    """This process's rank in its job, read without joining it: 0 outside any job.

    Commands that never join the job (`explain`, `plan`) run on rank 0 only.
    """
    group = group_from_env()
    if group is not None:
        return group.process_id
    cluster = _cluster_env()
    return cluster.get_process_id() if cluster else 0


def initialize() -> bool:
    """Join the job this process belongs to; True if it has more than one process.

    Idempotent. It must run before JAX starts its backend, as `jax.distributed` requires.
    """
    if jax.distributed.is_initialized():
        return True
    group = group_from_env()
    cluster = None if group else detected_cluster()
    if group is None and cluster is None:
        return False
    from jax._src import xla_bridge  # no public API tells whether the backend has started

    if xla_bridge.backends_are_initialized():
        raise SpmdError(
            "spmd.distributed.initialize() must run before any JAX computation; "
            "call it first thing in the program"
        )
    # CPU processes talk through gloo over TCP. Newer JAX defaults to it, older to nothing.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if group is None:
        jax.distributed.initialize()  # JAX reads the cluster's own variables
        return True
    jax.distributed.initialize(
        coordinator_address=group.coordinator,
        num_processes=group.num_processes,
        process_id=group.process_id,
        coordinator_bind_address=bind_address(group),
    )
    if group.is_loopback:
        _pin_gloo_to_loopback(group.host)
    return True


def _pin_gloo_to_loopback(host: str) -> None:
    """Make CPU collectives listen on loopback too, like the coordinator.

    Gloo otherwise listens on whatever address the machine's hostname resolves to, which
    may face the network. JAX exposes the choice only through its private backend factory;
    if that moves, collectives keep JAX's default rather than failing.
    """
    try:
        from functools import partial

        from jax._src import distributed as jax_distributed
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        if jax.config.jax_cpu_collectives_implementation != "gloo":
            return
        host = "127.0.0.1" if host == "localhost" else host
        gloo = _jax.make_gloo_tcp_collectives(jax_distributed.global_state.client, hostname=host)
        factory = partial(xla_bridge.make_cpu_client, collectives=gloo)
        xla_bridge.register_backend_factory("cpu", factory, priority=0, fail_quietly=False)
    except (ImportError, AttributeError, TypeError):
        return


def is_main_process() -> bool:
    """True in the one process that prints, logs metrics and writes single-writer files."""
    return jax.process_index() == 0


class AnyProcess:
    """Whether a flag (say, "a signal arrived") is set in any process, agreed by all of them.

    Each process sees a signal at its own moment. If each acted on its own flag, one would
    stop to save while another went on to the next step, and both would wait forever on the
    other's collectives. So the flags are combined on the devices, and every process reads
    the result one call late: the same answer at the same step everywhere, without making
    the host wait for the step in flight. In one process it is the flag itself.
    """

    def __init__(self):
        self._pending = None
        if jax.process_count() == 1:
            return
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array(jax.devices()), ("all",))
        self._sharding = NamedSharding(mesh, PartitionSpec("all"))
        self._max = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        local = np.full(jax.local_device_count(), flag, np.int32)
        votes = jax.make_array_from_process_local_data(self._sharding, local, (jax.device_count(),))
        previous, self._pending = self._pending, self._max(votes)
        return previous is not None and bool(jax.device_get(previous))


def allgather_int(value: int) -> list[int]:
    """Every process's `value`, in rank order, the same list everywhere (a collective: every
    process must call it, in the same order). In one process, `[value]`."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value)))]
