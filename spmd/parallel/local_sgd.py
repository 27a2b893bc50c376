"""Local SGD and DiLoCo over the `data` axis: the seed's two-level update.

Each slice of the mesh axes of the logical axis `workers` (by default `data`) is one worker
with its own copy of the parameters and its own inner optimizer state. The copies are stacked
on a leading `workers` dimension sharded over `data`, and the ordinary train step is
`jax.vmap`-ed over it with `spmd_axis_name`: inside a worker the other axes (fsdp, tensor,
...) work as usual, under rules in which nothing else uses `data` (`rules.worker_rules`).
So the inner step has no collective over `data` at all; its per-worker metrics come back
sharded and the host averages them.

Every H-th step is the sync step: the inner step, then the outer update. The workers'
parameter deltas from the global parameters are averaged over `data` (the only collective
over `data`), and the outer optimizer treats that average as a gradient: `avg` is plain SGD
(outer lr 1 sets the global parameters to the workers' mean), `nesterov` is DiLoCo's
Nesterov-momentum SGD. Every worker then restarts from the new global parameters; the inner
optimizer states stay per worker, as in DiLoCo.

The state is a `TrainState` whose `params` are the global (outer) parameters, so evaluation,
`spmd generate` and parameter-only restores read the model as usual; the worker copies, the
inner states and the outer state are its `opt_state` (a `LocalOptState`), so checkpoints hold
all of them and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from spmd import params as param_lib
from spmd.errors import SpmdError
from spmd.layout import Layout, sharded_structs
from spmd.mesh import parse_mesh
from spmd.models import Model
from spmd.rules import worker_rules
from spmd.train import state as state_lib
from spmd.train import step as step_lib
from spmd.train.config import OUTER_OPTIMIZERS
from spmd.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class LocalSGDConfig:
    """`local_steps` H: the workers synchronise every H steps (H=1: every step)."""

    local_steps: int
    outer_optimizer: str = "nesterov"
    outer_lr: float = 0.7  # DiLoCo's
    outer_momentum: float = 0.9

    def __post_init__(self):
        if self.local_steps < 1:
            raise SpmdError(f"--local-steps={self.local_steps} must be positive")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise SpmdError(
                f"--outer-optimizer {self.outer_optimizer!r} is not one of "
                f"{', '.join(OUTER_OPTIMIZERS)}"
            )
        if not 0 < self.outer_lr < float("inf"):
            raise SpmdError(f"--outer-lr={self.outer_lr} must be a positive number")
        if not 0 <= self.outer_momentum < 1:
            raise SpmdError(f"--outer-momentum={self.outer_momentum} must be in [0, 1)")

    def outer_tx(self) -> optax.GradientTransformation:
        if self.outer_optimizer == "avg":
            return optax.sgd(self.outer_lr)
        return optax.sgd(self.outer_lr, momentum=self.outer_momentum, nesterov=True)

    def is_sync(self, step: int) -> bool:
        """Whether step `step` (counted from 1) ends with the outer update. It depends on the
        step number alone, so a resumed run syncs where the uninterrupted one did."""
        return step % self.local_steps == 0


class LocalOptState(NamedTuple):
    """The two-level optimizer's state (a NamedTuple, as optax's are, for checkpoints)."""

    worker_params: Any  # the parameters, stacked on a leading `workers` dimension
    worker_opt: Any  # the inner optimizer's state, stacked likewise
    outer_opt: Any  # the outer optimizer's state, shaped like the parameters


def worker_layout(layout: Layout) -> Layout:
    return Layout(layout.mesh, worker_rules(layout.rules))


def worker_axes(layout: Layout) -> tuple[str, ...]:
    """The mesh axes that tell workers apart (those of size > 1)."""
    return tuple(a for a in layout.rules.mesh_axes("workers") if layout.shape[a] > 1)


def n_workers(layout: Layout) -> int:
    n = 1
    for a in worker_axes(layout):
        n *= layout.shape[a]
    return n


def check_layout(layout: Layout) -> None:
    if n_workers(layout) < 2:
        axes = "*".join(layout.rules.mesh_axes("workers")) or "data"
        raise SpmdError(
            f"--local-steps needs {axes} > 1 (each {axes} slice is one worker), "
            f"but the mesh is {layout.spec}"
        )


def check_same_workers(mesh: str, saved_mesh: str | None, step: int) -> None:
    """A checkpoint's worker states are stacked per `data` slice (the default `workers`
    rule), so a resumed run must keep their number; refused before restoring anything."""
    mine = parse_mesh(mesh, jax.device_count()).shape["data"]
    sizes = dict(kv.split("=", 1) for kv in (saved_mesh or "").split(",") if "=" in kv)
    saved = int(sizes.get("data", 1))
    if saved != mine:
        raise SpmdError(
            f"--resume: local SGD with data={mine} workers cannot continue the checkpoint at "
            f"step {step}, which has data={saved}; keep data={saved} or use a new --ckpt-dir"
        )


def _stacked(sharding: NamedSharding, layout: Layout) -> NamedSharding:
    axes = worker_axes(layout)
    lead = axes[0] if len(axes) == 1 else axes
    return NamedSharding(sharding.mesh, PartitionSpec(lead, *sharding.spec))


def metrics_sharding(layout: Layout) -> NamedSharding:
    """Per-worker metrics, shape (workers,): each stays on its worker's devices."""
    return _stacked(layout.replicated, layout)


def state_shardings(model, tx, outer_tx, layout: Layout) -> TrainState:
    inner = worker_layout(layout)
    one = state_lib.state_shardings(model, tx, inner)
    outer = state_lib.state_shardings(model, outer_tx, inner)
    stack = jax.tree.map(lambda s: _stacked(s, layout), (one.params, one.opt_state))
    return TrainState(
        step=layout.replicated,
        params=one.params,
        opt_state=LocalOptState(*stack, outer.opt_state),
    )


def fresh_state(model: Model, tx, outer_tx, key, workers: int) -> TrainState:
    """The same global parameters as a synchronous run from `key`, copied to every worker."""
    params = param_lib.init_unsharded(model.specs(), key)
    copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (workers, *p.shape)), params)
    inner = jax.vmap(tx.init)(copies)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=LocalOptState(copies, inner, outer_tx.init(params)),
    )


def abstract_state(model, tx, outer_tx, layout: Layout, shardings: TrainState) -> TrainState:
    workers = n_workers(layout)
    shapes = jax.eval_shape(lambda: fresh_state(model, tx, outer_tx, jax.random.key(0), workers))
    return sharded_structs(shapes, shardings)


def init_state(model, tx, outer_tx, key, layout: Layout, shardings: TrainState) -> TrainState:
    workers = n_workers(layout)
    fresh = jax.jit(lambda k: fresh_state(model, tx, outer_tx, k, workers), out_shardings=shardings)
    return fresh(key)


def _split_batch(batch, workers: int):
    """(B, ...) -> (workers, B/workers, ...): worker w takes the w-th contiguous block of rows,
    which is exactly the block its devices already hold under the `batch` rule."""
    return jax.tree.map(lambda x: x.reshape(workers, x.shape[0] // workers, *x.shape[1:]), batch)


def inner_step(state: TrainState, batch, *, model, opt, schedule, grad_accum, axes, workers):
    """One step of every worker on its own rows; no communication between workers."""
    local: LocalOptState = state.opt_state

    def one_worker(params, opt_state, rows):
        out, metrics = step_lib.train_step(
            TrainState(state.step, params, opt_state),
            rows,
            model=model,
            opt=opt,
            schedule=schedule,
            grad_accum=grad_accum,
        )
        return out.params, out.opt_state, metrics

    step_all = jax.vmap(one_worker, spmd_axis_name=axes)
    params, opt_state, metrics = step_all(
        local.worker_params, local.worker_opt, _split_batch(batch, workers)
    )
    local = local._replace(worker_params=params, worker_opt=opt_state)
    return state.replace(step=state.step + 1, opt_state=local), metrics


def sync_step(state: TrainState, batch, *, outer_tx, workers, **inner):
    """The inner step, then the outer update on the workers' averaged parameter delta."""
    state, metrics = inner_step(state, batch, workers=workers, **inner)
    local: LocalOptState = state.opt_state
    with jax.named_scope("outer_update"):
        delta = jax.tree.map(
            lambda g, w: jnp.mean(g[None] - w, axis=0), state.params, local.worker_params
        )
        updates, outer_opt = outer_tx.update(delta, local.outer_opt, state.params)
        params = optax.apply_updates(state.params, updates)
        copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (workers, *p.shape)), params)
    local = local._replace(worker_params=copies, outer_opt=outer_opt)
    return state.replace(params=params, opt_state=local), metrics
