"""The layout: one mesh and one rules table, travelling together.

Everything that places an array goes through a `Layout`: parameter, optimizer-state and
batch shardings, the abstract (sharded, memory-free) inputs of an ahead-of-time compile, and
the tracing context in which `rules.constrain` pins activations. The trainer, the compiler
report, the planner and the generator all take one, so no code parses a mesh string twice or
carries rules as a loose argument beside a mesh.

The mesh may be an `AbstractMesh` (axis sizes only): the planner checks layouts for 256
devices that this machine does not have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from spmd import params as param_lib
from spmd.errors import SpmdError
from spmd.mesh import MESH_AXES, MeshConfig, make_mesh
from spmd.rules import Logical, Rules, logical_to_spec, sharding_context


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: Mesh | AbstractMesh
    rules: Rules = Rules()

    @classmethod
    def make(
        cls,
        mesh: str | Mapping[str, int] | MeshConfig | Mesh,
        rules: Rules | None = None,
        devices: Sequence[jax.Device] | None = None,
    ) -> Layout:
        """From a mesh spec (`"fsdp=4,tensor=2"`, a dict) over `devices` (default: all)."""
        if not isinstance(mesh, Mesh):
            mesh = make_mesh(mesh, devices)
        return cls(mesh, rules or Rules())

    @classmethod
    def abstract(cls, sizes: Mapping[str, int], rules: Rules | None = None) -> Layout:
        """Axis sizes only, no devices: for checking and costing layouts of any size."""
        shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
        return cls(AbstractMesh(shape, MESH_AXES), rules or Rules())

    # --- the mesh ---------------------------------------------------------------------------

    @property
    def shape(self) -> dict[str, int]:
        return {a: int(self.mesh.shape[a]) for a in MESH_AXES}

    @property
    def spec(self) -> str:
        """The mesh in its short string form (`fsdp=4,tensor=2`)."""
        return MeshConfig(**self.shape).spec()

    @property
    def devices(self) -> int:
        return math.prod(self.shape.values())

    def to_json(self) -> dict:
        return {"mesh": self.spec, "rules": self.rules.to_json()}

    # --- shardings --------------------------------------------------------------------------

    def pspec(self, logical: Logical, shape: Sequence[int] | None = None) -> PartitionSpec:
        return logical_to_spec(logical, self.mesh, self.rules, shape)

    def sharding(self, logical: Logical, shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.pspec(logical, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_shardings(self, specs) -> Any:
        return _map_specs(lambda s: self.sharding(s.axes, s.shape), specs)

    def abstract_params(self, specs) -> Any:
        """ShapeDtypeStructs carrying their shardings: compile or restore without memory."""
        return sharded_structs(param_lib.abstract(specs), self.param_shardings(specs))

    def init_params(self, specs, key: jax.Array) -> Any:
        """Parameter values born on their shards (never gathered on one device)."""
        init = jax.jit(
            lambda k: param_lib.init_unsharded(specs, k), out_shardings=self.param_shardings(specs)
        )
        return init(key)

    @property
    def batch_shards(self) -> int:
        """How many ways the `batch` logical axis is split."""
        return math.prod(self.shape[a] for a in self.rules.mesh_axes("batch"))

    def check_batch(self, global_batch: int, grad_accum: int = 1) -> None:
        """Each microbatch must split evenly over the batch axes; say so before JAX does."""
        if grad_accum < 1:
            raise SpmdError(f"--grad-accum={grad_accum} must be positive")
        if global_batch % grad_accum:
            raise SpmdError(f"batch={global_batch} is not divisible by grad_accum={grad_accum}")
        micro = global_batch // grad_accum
        if micro % self.batch_shards:
            split = "*".join(
                f"{a}={self.shape[a]}" for a in self.rules.mesh_axes("batch") if self.shape[a] > 1
            )
            what = f"microbatch={micro}" if grad_accum > 1 else f"batch={global_batch}"
            raise SpmdError(f"{what} is not divisible by {split}")

    def batch_shardings(self, batch_axes: Mapping[str, Logical], shapes: Mapping[str, tuple]):
        return {k: self.sharding(batch_axes[k], shape) for k, shape in shapes.items()}

    # --- tracing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """While tracing inside this block, `constrain` pins activations to this layout."""
        with sharding_context(self.mesh, self.rules):
            yield

    def traced(self, fn: Callable) -> Callable:
        """`fn`, traced inside this layout's context (what `jax.jit` of a model step needs)."""

        @functools.wraps(fn)
        def in_context(*args, **kwargs):
            with self.context():
                return fn(*args, **kwargs)

        return in_context


def sharded_structs(shapes, shardings) -> Any:
    """ShapeDtypeStructs (shape and dtype from `shapes`) with `shardings`, leaf by leaf."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _map_specs(fn, specs):
    return jax.tree.map(fn, specs, is_leaf=param_lib.is_spec)
