"""Device meshes: the six named axes, parsing of mesh specs, and simulated CPU devices.

The axes run from the slowest links to the fastest, so that `jax.make_mesh` puts the
innermost axis (`tensor`) on neighbouring devices. A size of 1 switches an axis off, which
is why the layout is chosen by the mesh shape alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from spmd.distributed import launched_processes
from spmd.errors import SpmdError

MESH_AXES: tuple[str, ...] = ("data", "stage", "fsdp", "sequence", "expert", "tensor")
# XLA:CPU cannot compile for more devices than this ("Multiprocess computations aren't
# implemented on the CPU backend"), so a bigger CPU mesh is refused before compiling.
CPU_COMPILE_LIMIT = 2048


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the six mesh axes. Every axis is present; 1 means off."""

    data: int = 1
    stage: int = 1
    fsdp: int = 1
    sequence: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or size < 1:
                raise SpmdError(f"mesh axis {name}={size} must be a positive integer")

    @property
    def shape(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    @property
    def size(self) -> int:
        return int(np.prod(list(self.shape.values())))

    def spec(self) -> str:
        """The short string form, listing only the axes that are on (`fsdp=4,tensor=2`)."""
        on = [f"{k}={v}" for k, v in self.shape.items() if v > 1]
        return ",".join(on) or "data=1"


def parse_mesh(spec: str | Mapping[str, int] | MeshConfig, n_devices: int) -> MeshConfig:
    """Parse `"fsdp=4,tensor=2"` or a dict into a MeshConfig that uses exactly n_devices.

    Missing axes are 1; one axis may be -1, meaning "the rest of the devices".
    """
    if isinstance(spec, MeshConfig):
        sizes = spec.shape
    elif isinstance(spec, str):
        sizes = _parse_mesh_string(spec)
    elif isinstance(spec, Mapping):
        sizes = dict(spec)
    else:
        raise SpmdError(f"mesh must be a string like 'fsdp=4,tensor=2' or a dict, got {spec!r}")
    unknown = [k for k in sizes if k not in MESH_AXES]
    if unknown:
        raise SpmdError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)}")
    sizes = {k: _as_int(k, v) for k, v in sizes.items()}
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise SpmdError(f"at most one mesh axis may be -1, got {' and '.join(rest)}")
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad:
        raise SpmdError(f"mesh axis {bad[0]}={sizes[bad[0]]} must be positive (or -1)")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if rest:
        if n_devices % fixed:
            raise SpmdError(
                f"mesh {_fmt(sizes)} cannot fill {n_devices} devices: "
                f"{n_devices} is not divisible by {fixed}"
            )
        sizes[rest[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise SpmdError(
            f"mesh {_fmt(sizes)} has {fixed} devices but {n_devices} are available; "
            + _devices_hint(fixed, n_devices)
        )
    return MeshConfig(**sizes)


def _devices_hint(fixed: int, n_devices: int) -> str:
    """How to get `fixed` devices. The processes of `spmd launch` refuse --devices: there the
    launcher's own flag sets the count, per process."""
    other = f"a mesh whose sizes multiply to {n_devices}"
    procs = launched_processes()
    if procs is None:
        return f"use --devices {fixed} or {other}"
    if fixed % procs:
        return f"use {other} ({procs} processes cannot share {fixed} devices evenly)"
    return f"use spmd launch -n {procs} --devices-per-process {fixed // procs} or {other}"


def make_mesh(
    spec: str | Mapping[str, int] | MeshConfig, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `jax.sharding.Mesh` with all six axes (Auto axis types) over `devices`.

    By default it uses every device; the spec must use exactly as many devices as given.
    """
    devices = list(jax.devices() if devices is None else devices)
    if devices[0].platform == "cpu" and len(devices) > CPU_COMPILE_LIMIT:
        raise SpmdError(
            f"{len(devices)} CPU devices are more than XLA:CPU can compile for "
            f"({CPU_COMPILE_LIMIT}); use fewer --devices, or spmd plan to estimate bigger layouts"
        )
    cfg = parse_mesh(spec, len(devices))
    return jax.make_mesh(
        tuple(cfg.shape.values()),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}


def simulate_cpu_devices(n: int) -> None:
    """Make the CPU backend present `n` devices. Call it before JAX runs anything.

    Once the backend has started, the device count is fixed: asking for the same count again
    is a no-op, asking for another count raises SpmdError.
    """
    if not isinstance(n, int) or n < 1:
        raise SpmdError(f"--devices must be a positive integer, got {n!r}")
    from jax._src import xla_bridge  # no public API tells whether the backend has started

    if xla_bridge.backends_are_initialized():
        have = jax.device_count()
        if have != n:
            raise SpmdError(
                f"cannot simulate {n} CPU devices: JAX's backend already started with {have}; "
                "call spmd.simulate_cpu_devices before any JAX computation"
            )
        return
    jax.config.update("jax_num_cpu_devices", n)
    # Subprocesses (spmd launch, tests) inherit the flag form as well.
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])


def _parse_mesh_string(spec: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise SpmdError(f"mesh entry {part!r} must look like axis=size, e.g. fsdp=4")
        name = name.strip()
        if name in sizes:
            raise SpmdError(f"mesh axis {name!r} is given twice")
        sizes[name] = _as_int(name, value.strip())
    return sizes


def _as_int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpmdError(f"mesh axis {name} has size {value!r}, which is not an integer") from None


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items()) or "(empty)"
