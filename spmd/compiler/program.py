"""The one path from (model, layout) to the compiled train step.

`TrainProgram` holds what fixes a step's program: the model, the layout, the global batch's
shapes and dtypes, the optimizer and the grad-accum count. From it come the state and batch
shardings (computed once), the abstract inputs, the initial state and the compiled step. The
trainer, `spmd explain`, `spmd plan` and the experiments all compile through `TrainProgram.compile`,
so what the compiler report shows is by construction what training runs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from spmd.errors import SpmdError
from spmd.layout import Layout, sharded_structs
from spmd.models import Model, get_model
from spmd.parallel import local_sgd, ring_attention
from spmd.parallel import pipeline as pipeline_lib
from spmd.train import optim, state, step

# The flags that set a model field, so that `--set remat=full` and `--remat dots` cannot
# silently overrule each other.
FIELD_FLAGS = {
    "remat": "--remat",
    "compute_dtype": "--dtype",
    "attention": "--attention",
    "context_parallel": "--context-parallel",
}


def build_model(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    remat: str | None = None,
    dtype: str | None = None,
    attention: str | None = None,
    seq: int | None = None,
    context_parallel: str | None = None,
) -> Model:
    """A preset with `--set` overrides, plus `--remat` / `--dtype` / `--attention` /
    `--context-parallel` when given (None: the model's own), checked against the sequence
    length."""
    fields = dict(overrides or {})
    flags = (("remat", remat), ("compute_dtype", dtype), ("attention", attention),
             ("context_parallel", context_parallel))  # fmt: skip
    for field, value in flags:
        if value is None:
            continue
        if field in fields and str(fields[field]) != value:
            raise SpmdError(
                f"{FIELD_FLAGS[field]} {value} contradicts --set {field}={fields[field]}; "
                "give only one of them"
            )
        fields[field] = value
    model = get_model(name, fields)
    max_len = getattr(model.cfg, "max_seq_len", None)
    if seq is not None and max_len is not None and seq > max_len:
        raise SpmdError(f"--seq={seq} exceeds the model's max_seq_len={max_len}")
    return model


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The executable, and what it was compiled from. Call it as `step(state, batch)`.

    Under local SGD there are two: `executable` is the inner step and `sync` the inner step
    plus the outer update; call it as `step(state, batch, n)` with the step number n (from 1)."""

    program: TrainProgram
    executable: jax.stages.Compiled
    compile_s: float
    sync: jax.stages.Compiled | None = None

    def __call__(self, train_state, batch, step_number: int | None = None):
        if self.sync is None:
            return self.executable(train_state, batch)
        if step_number is None:
            raise ValueError("a local-SGD step needs its step number: step(state, batch, n)")
        sync = self.program.local.is_sync(step_number)
        return (self.sync if sync else self.executable)(train_state, batch)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainProgram:
    model: Model
    layout: Layout
    batch_spec: Mapping[str, jax.ShapeDtypeStruct]  # the global batch's arrays, unsharded
    tx: optax.GradientTransformation
    schedule: Callable
    grad_accum: int = 1
    pipeline: pipeline_lib.PipelineConfig | None = None  # as asked; `pipe` is what runs
    local: local_sgd.LocalSGDConfig | None = None  # local SGD / DiLoCo; None: synchronous

    def __post_init__(self):
        self.layout.check_batch(self.batch, self.grad_accum)
        _ = self.pipe  # a bad pipeline is refused here, before anything compiles
        if self.local is not None:
            local_sgd.check_layout(self.layout)
            if self.pipe is not None:
                raise SpmdError("--local-steps with a stage mesh is not supported yet")

    @functools.cached_property
    def pipe(self) -> pipeline_lib.PipelineConfig | None:
        """The pipeline schedule this program runs (None unless the mesh has `stage`)."""
        return pipeline_lib.for_program(
            self.pipeline, self.model, self.layout, self.batch // self.grad_accum
        )

    @classmethod
    def for_tokens(
        cls,
        model: Model,
        layout: Layout,
        batch: int,
        seq: int,
        *,
        grad_accum: int = 1,
        optimizer: optim.OptimConfig | None = None,
        pipeline: pipeline_lib.PipelineConfig | None = None,
        local: local_sgd.LocalSGDConfig | None = None,
    ) -> TrainProgram:
        """A language model's program: every batch entry is `(batch, seq)` token ids."""
        # Before the batch's shardings, whose error would not say why it takes 2*sequence.
        ring_attention.check_length(seq, ring_attention.shards(layout.mesh, layout.rules))
        tx, schedule = optim.make_optimizer(optimizer or optim.OptimConfig())
        tokens = jax.ShapeDtypeStruct((batch, seq), np.int32)
        batch_spec = {k: tokens for k in model.batch_axes}
        return cls(model, layout, batch_spec, tx, schedule, grad_accum, pipeline, local)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.batch_spec.items()}

    @property
    def batch(self) -> int:
        return next(iter(self.shapes.values()))[0]

    @functools.cached_property
    def outer_tx(self) -> optax.GradientTransformation | None:
        return self.local.outer_tx() if self.local else None

    @functools.cached_property
    def state_shardings(self) -> state.TrainState:
        if self.local:
            return local_sgd.state_shardings(self.model, self.tx, self.outer_tx, self.layout)
        return state.state_shardings(self.model, self.tx, self.layout)

    @functools.cached_property
    def batch_shardings(self) -> dict:
        return self.layout.batch_shardings(self.model.batch_axes, self.shapes)

    @functools.cached_property
    def abstract_state(self) -> state.TrainState:
        if self.local:
            return local_sgd.abstract_state(
                self.model, self.tx, self.outer_tx, self.layout, self.state_shardings
            )
        return state.abstract_state(self.model, self.tx, self.state_shardings)

    @functools.cached_property
    def abstract_batch(self) -> dict:
        return sharded_structs(dict(self.batch_spec), self.batch_shardings)

    def init_state(self, key: jax.Array) -> state.TrainState:
        """A fresh state, born on its shards."""
        if self.local:
            return local_sgd.init_state(
                self.model, self.tx, self.outer_tx, key, self.layout, self.state_shardings
            )
        return state.init_state(self.model, self.tx, key, self.state_shardings)

    def jitted(self, sync: bool = False):
        """The step jitted with shardings in and out and the state donated (not yet compiled:
        batches of other shapes would compile again, so prefer `compile`). Under local SGD,
        the inner step, or with `sync` the inner step plus the outer update."""
        kw = dict(model=self.model, opt=self.tx, schedule=self.schedule)
        kw.update(grad_accum=self.grad_accum)
        fn = functools.partial(step.train_step, pipeline=self.pipe, **kw)
        layout, metrics = self.layout, None
        if self.local:
            kw.update(axes=local_sgd.worker_axes(layout), workers=local_sgd.n_workers(layout))
            if sync:
                fn = functools.partial(local_sgd.sync_step, outer_tx=self.outer_tx, **kw)
            else:
                fn = functools.partial(local_sgd.inner_step, **kw)
            metrics = local_sgd.metrics_sharding(layout)  # per worker: the host averages them
            layout = local_sgd.worker_layout(layout)  # traced where only `workers` uses data
        return jax.jit(
            layout.traced(fn),
            in_shardings=(self.state_shardings, self.batch_shardings),
            out_shardings=(self.state_shardings, metrics or self.layout.replicated),
            donate_argnums=(0,),
        )

    def compile(self) -> CompiledStep:
        """Lower and compile ahead of time on abstract inputs: nothing is allocated."""
        t0 = time.perf_counter()
        args = (self.abstract_state, self.abstract_batch)
        executable = self.jitted().lower(*args).compile()
        sync = self.jitted(sync=True).lower(*args).compile() if self.local else None
        return CompiledStep(self, executable, time.perf_counter() - t0, sync)

    def eval_loss(self):
        """The model's loss on a batch, jitted on this layout (for validation)."""
        return jax.jit(
            self.layout.traced(self.model.loss),
            in_shardings=(self.state_shardings.params, self.batch_shardings),
            out_shardings=self.layout.replicated,
        )
