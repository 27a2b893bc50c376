"""The one place where logical axis names become mesh axes.

Model code names logical axes (`batch`, `embed`, `heads`, ...). `Rules` maps each onto zero
or more mesh axes, and `logical_to_spec` turns a tuple of logical names into a
`PartitionSpec`, dropping mesh axes of size 1 so specs read as the layout really is.
Activation constraints read the active mesh and rules from a context, so a model stays a
pure function that never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spmd.errors import SpmdError
from spmd.mesh import MESH_AXES

# One entry per array dimension: a logical name, None (replicated), or a tuple of names for a
# dimension that merges several (the flattened `(batch, length)` rows of a dense layer).
Logical = tuple[str | tuple[str, ...] | None, ...]
ROWS = ("batch", "length")  # the flattened (b*t) rows of a dense layer's 2-D activations

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "length": ("sequence",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": ("stage",),
    "experts": ("expert",),
    # Local SGD / DiLoCo: the leading dimension of the per-worker (stacked) parameter copies
    # and optimizer states. Each slice of these mesh axes is one worker.
    "workers": ("data",),
}

# Grouped-query attention under tensor parallelism: when `tensor` exceeds (or does not divide)
# the KV heads, each KV head is replicated across the tensor ranks that share it, as
# Megatron-LM and MaxText do, instead of refusing the mesh. The query heads still split.
REPLICATED_WHEN_INDIVISIBLE = ("kv_heads",)


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name -> mesh axes. A name maps to `()` to be replicated on purpose; a
    name missing from the table is an error, so a typo in model code cannot silently
    replicate a weight that was meant to be split."""

    table: tuple[tuple[str, tuple[str, ...]], ...] = tuple(DEFAULT_RULES.items())
    # Logical axes that are replicated, not refused, where their mesh axes do not divide them.
    replicated_when_indivisible: tuple[str, ...] = REPLICATED_WHEN_INDIVISIBLE

    def __post_init__(self):
        for name, axes in self.table:
            for axis in axes:
                if axis not in MESH_AXES:
                    raise SpmdError(f"rule {name!r} names unknown mesh axis {axis!r}")

    @classmethod
    def default(cls, overrides: Mapping[str, Sequence[str] | str | None] | None = None) -> Rules:
        table = dict(DEFAULT_RULES)
        for name, axes in (overrides or {}).items():
            table[name] = _as_axes(axes)
        return cls(tuple(table.items()), REPLICATED_WHEN_INDIVISIBLE)

    def mesh_axes(self, logical: str | tuple[str, ...] | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        if isinstance(logical, tuple):
            return tuple(a for name in logical for a in self.mesh_axes(name))
        table = dict(self.table)
        if logical not in table:
            raise SpmdError(
                f"logical axis {logical!r} has no rule (known: {', '.join(table)}); add one, "
                f"e.g. Rules.default({{{logical!r}: None}}) to replicate it"
            )
        return table[logical]

    def to_json(self) -> dict[str, list[str]]:
        return {name: list(axes) for name, axes in self.table}


def worker_rules(rules: Rules) -> Rules:
    """The rules inside one local-SGD worker: no logical axis but `workers` may use the
    workers' mesh axes, so a worker's step has no collective across workers."""
    outer = set(rules.mesh_axes("workers"))
    table = tuple(
        (name, axes if name == "workers" else tuple(a for a in axes if a not in outer))
        for name, axes in rules.table
    )
    return dataclasses.replace(rules, table=table)


def _as_axes(axes: Sequence[str] | str | None) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical: Logical,
    mesh: Mesh,
    rules: Rules | None = None,
    shape: Sequence[int] | None = None,
    manual: Sequence[str] = (),
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical` names.

    Raises SpmdError if a mesh axis would shard two dimensions, or (given `shape`) if a
    dimension is not divisible by the mesh axes it is split over.
    """
    rules = rules or Rules()
    # Axes a shard_map already splits by hand (`manual`) count as size 1: `shape` is local.
    sizes = {a: 1 if a in manual else n for a, n in dict(mesh.shape).items()}
    used: dict[str, str | None] = {}
    entries = []
    for dim, name in enumerate(logical):
        axes = tuple(a for a in rules.mesh_axes(name) if sizes.get(a, 1) > 1)
        if shape is not None and _replicate(name, shape[dim], axes, sizes, rules):
            axes = ()
        for axis in axes:
            if axis in used:
                raise SpmdError(
                    f"mesh axis {axis!r} would shard both {used[axis]!r} and {name!r} "
                    f"in one array with axes {logical}; fix the rules"
                )
            used[axis] = name
        if shape is not None:
            check_divisible(name, shape[dim], axes, sizes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _replicate(name, dim: int, axes: Sequence[str], sizes: Mapping[str, int], rules) -> bool:
    split = math.prod(sizes[a] for a in axes)
    return name in rules.replicated_when_indivisible and dim % split != 0


def check_divisible(name, dim: int, axes: Sequence[str], sizes: Mapping[str, int]):
    """`heads=4 is not divisible by tensor=3`: one line naming the dimension and the axes."""
    total = 1
    for a in axes:
        total *= sizes[a]
    if total > 1 and dim % total:
        split = "*".join(f"{a}={sizes[a]}" for a in axes)
        label = "*".join(name) if isinstance(name, tuple) else name
        raise SpmdError(f"{label}={dim} is not divisible by {split}")


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: Rules


_CONTEXT: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "spmd_sharding_context", default=None
)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules | None = None) -> Iterator[ShardingContext]:
    """Within this block (while tracing), `constrain` pins activations to the mesh."""
    ctx = ShardingContext(mesh, rules or Rules())
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def current_context() -> ShardingContext | None:
    return _CONTEXT.get()


def constrain(x: jax.Array, logical: Logical) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside a context."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    here = jax.sharding.get_abstract_mesh()
    if here.empty or not here.manual_axes:
        here = None
    # Inside a partly manual `shard_map` (the pipeline's, manual over `stage` and `data`) a
    # constraint names the tracing context's abstract mesh and only the automatic axes.
    manual = here.manual_axes if here is not None else ()
    spec = logical_to_spec(logical, ctx.mesh, ctx.rules, x.shape, manual)
    return jax.lax.with_sharding_constraint(x, NamedSharding(here or ctx.mesh, spec))
