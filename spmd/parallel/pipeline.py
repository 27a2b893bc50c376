"""Pipeline parallelism over the mesh axis `stage`: GPipe, 1F1B and interleaved schedules.

The stacked layer dimension (logical axis `layers`) is split over `stage`, so stage s holds
layers [s*L/S, (s+1)*L/S) as its shard of the ordinary, canonical parameter arrays (a
checkpoint restores onto a mesh without `stage` unchanged). The train step's loss and
gradients then run inside a `jax.shard_map` that is manual over `stage` only: the other
axes (data, fsdp, tensor, ...) stay automatic, so the model's own sharding constraints keep
working inside a stage. Activations move between neighbouring stages with `ppermute`.

Schedules (S stages, M microbatches, V virtual stages per device):
- gpipe: every microbatch runs forward through all stages (M+S-1 ticks), then autodiff
  runs the same loop backward. Live activations: the residuals of all M+S-1 ticks.
- interleaved: device s holds V chunks, virtual stages s, S+s, 2S+s, ... (round robin); a
  microbatch circles the ring V times (VM+S-1 ticks of a V-th of the work each), so the
  bubble shrinks by about V. Backward by autodiff, as gpipe.
- 1f1b: a hand-written loop (spmd/parallel/one_f_one_b.py) in which each tick does one
  forward and one backward; live activations are bounded by 2S-1 stage inputs, not M.

Placement of the embedding and the head: both stay replicated over `stage` (stored as the
rules say, split only over fsdp/tensor) and every stage computes them, masked, keeping only
the first stage's embedding and the last stage's loss. The alternative, a `lax.cond` on the
stage index, puts the head's fsdp/tensor collectives inside a branch; the masked form keeps
one straight-line SPMD program. The cost is the head's FLOPs on every stage (S-1 redundant
copies): for gpt-tiny on CPU see the README's measurement; for large-vocabulary models this
is the first thing to move to the last stage.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spmd.errors import SpmdError
from spmd.models import Model, gpt
from spmd.models.loss import split_rows
from spmd.rules import constrain, current_context

SCHEDULES = ("gpipe", "1f1b", "interleaved")
AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    schedule: str = "gpipe"
    microbatches: int | None = None  # None: as many as stages (the fewest 1f1b accepts)
    virtual_stages: int = 1

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise SpmdError(
                f"--pipeline-schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}"
            )
        for name in ("microbatches", "virtual_stages"):
            value = getattr(self, name)
            if value is None and name == "microbatches":
                continue
            if not isinstance(value, int) or value < 1:
                raise SpmdError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise SpmdError(
                f"--virtual-stages={self.virtual_stages} needs --pipeline-schedule interleaved"
            )

    def check(self, n_layers: int, stage: int, rows: int, batch_split: dict[str, int]) -> None:
        """Divisibility the schedule needs, as one line naming the flag (before compiling).
        `rows`: the sequences of one gradient-accumulation step; `batch_split`: the mesh axes
        that split a microbatch's rows."""
        m, v = self.microbatches, self.virtual_stages
        if n_layers % stage:
            raise SpmdError(f"n_layers={n_layers} is not divisible by stage={stage}")
        per_stage = n_layers // stage
        if per_stage % v:
            raise SpmdError(
                f"--virtual-stages={v} does not divide the {per_stage} layers per stage "
                f"(n_layers={n_layers} / stage={stage})"
            )
        if self.schedule != "gpipe" and m < stage:
            raise SpmdError(
                f"--microbatches={m} must be at least stage={stage} under {self.schedule}"
            )
        if rows % m:
            raise SpmdError(f"batch={rows} (per step) is not divisible by --microbatches={m}")
        shards = 1
        for size in batch_split.values():
            shards *= size
        if (rows // m) % shards:
            split = "*".join(f"{a}={n}" for a, n in batch_split.items() if n > 1)
            raise SpmdError(
                f"microbatch={rows // m} (--microbatches={m}) is not divisible by {split}"
            )

    def ticks(self, stage: int) -> int:
        """Loop iterations of one pass (1f1b: its forward and backward together)."""
        if self.schedule == "1f1b":
            return self.microbatches + 2 * (stage - 1)
        return self.virtual_stages * self.microbatches + stage - 1

    def bubble(self, stage: int) -> float:
        """Idle fraction of each stage's time: (S-1)/(VM+S-1) (V=1 for gpipe and 1f1b)."""
        return (stage - 1) / (self.virtual_stages * self.microbatches + stage - 1)


def for_program(pipe: PipelineConfig | None, model: Model, layout, rows: int):
    """The pipeline a program runs: None without `stage`, else `pipe` (default: gpipe over
    `stage` microbatches) checked against the model, the layout and the per-step `rows`."""
    n_stages = layout.shape[AXIS]
    if n_stages == 1:
        if pipe is not None:
            raise SpmdError(
                "--pipeline-schedule, --microbatches and --virtual-stages need a mesh with stage>1"
            )
        return None
    if not isinstance(model.cfg, gpt.GPTConfig):
        raise SpmdError(
            f"stage={n_stages} (pipeline parallelism) needs a gpt model, not {model.name!r}"
        )
    pipe = pipe or PipelineConfig()
    if pipe.microbatches is None:
        pipe = dataclasses.replace(pipe, microbatches=n_stages)
    split = {a: layout.shape[a] for a in layout.rules.mesh_axes("batch")}
    pipe.check(model.cfg.n_layers, n_stages, rows, split)
    return pipe


def value_and_grad(model: Model, pipe: PipelineConfig):
    """`(params, batch) -> (loss, grads)` like `jax.value_and_grad(model.loss)`, pipelined
    over `stage` of the active layout (traced inside `Layout.context()`)."""
    if pipe.schedule == "1f1b":
        from spmd.parallel import one_f_one_b  # the hand-written loop lives beside this one

        return functools.partial(one_f_one_b.value_and_grad, cfg=model.cfg, pipe=pipe)
    return jax.value_and_grad(functools.partial(circular_loss, cfg=model.cfg, pipe=pipe))


def stages() -> int:
    ctx = current_context()
    return int(ctx.mesh.shape[AXIS]) if ctx is not None else 1


def microbatched(batch, m: int):
    """(B, t) token arrays -> (M, B/M, t), strided so no rows cross devices (as grad accum)."""
    return {k: constrain(split_rows(x, m), (None, "batch", "length")) for k, x in batch.items()}


def layer_axes(cfg: gpt.GPTConfig):
    return jax.tree.map(
        lambda s: s.axes, gpt.param_specs(cfg)["layers"], is_leaf=lambda x: hasattr(x, "axes")
    )


def prepare(params, cfg: gpt.GPTConfig, n_stages: int, virtual: int):
    """The parameters as the stages consume them: layer matrices cast to the compute dtype
    and, for V > 1, the stack reordered so that stage s's contiguous shard holds virtual
    stages s, S+s, ... . The reorder moves (V-1)/V of the layer weights across `stage` each
    step (and their gradients back): the price of keeping checkpoints in canonical order."""
    params = gpt.in_compute_dtype(params, cfg)
    if virtual == 1:
        return params

    def reorder(w, axes):
        chunks = w.reshape(virtual, n_stages, -1, *w.shape[1:])
        return constrain(jnp.swapaxes(chunks, 0, 1).reshape(w.shape), axes)

    layers = jax.tree.map(
        reorder, params["layers"], layer_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )
    return {**params, "layers": layers}


def param_specs_in(params):
    """shard_map in_specs: the layer stack split over `stage`, everything else whole."""
    specs = {}
    for name, tree in params.items():
        spec = P(AXIS) if name == "layers" else P()
        specs[name] = jax.tree.map(lambda _, spec=spec: spec, tree)
    return specs


def circular_loss(params, batch, *, cfg: gpt.GPTConfig, pipe: PipelineConfig):
    """The mean loss of `batch` through the gpipe / interleaved forward loop."""
    n_stages = stages()
    micro = microbatched(batch, pipe.microbatches)
    prepared = prepare(params, cfg, n_stages, pipe.virtual_stages)
    body = functools.partial(
        _circular_body, cfg=cfg, n_stages=n_stages, virtual=pipe.virtual_stages
    )
    return jax.shard_map(
        body,
        mesh=current_context().mesh,
        in_specs=(param_specs_in(prepared), P(), P()),
        out_specs=P(),
        axis_names={AXIS},
    )(prepared, micro["inputs"], micro["targets"])


def embed_all(params, tokens_mbt, cfg: gpt.GPTConfig):
    """Every microbatch's embedding (M, b, t, d), one microbatch at a time."""
    return jax.lax.map(lambda tok: gpt.embed(params, tok, cfg), tokens_mbt)


def varying(x):
    """Mark a loop-carry initial value as differing across stages, as ppermute's output is."""

    def cast(a):
        return (
            a
            if AXIS in jax.typeof(a).manual_axis_type.varying
            else jax.lax.pcast(a, AXIS, to="varying")
        )

    return jax.tree.map(cast, x)


def chunk(layers, v, virtual: int):
    """The v-th of the `virtual` chunks of this stage's local layers."""
    return jax.tree.map(
        lambda w: jax.lax.dynamic_index_in_dim(
            w.reshape(virtual, -1, *w.shape[1:]), v, keepdims=False
        ),
        layers,
    )


def _circular_body(params, tokens, targets, *, cfg, n_stages: int, virtual: int):
    s = jax.lax.axis_index(AXIS)
    m = tokens.shape[0]
    emb = embed_all(params, tokens, cfg)
    cos, sin = gpt.rope_for(tokens[0], cfg)
    ring = [(k, (k + 1) % n_stages) for k in range(n_stages if virtual > 1 else n_stages - 1)]

    def tick(carry, t):
        recv, pending, outputs = carry
        u = t - s
        uc = jnp.clip(u, 0, virtual * m - 1)
        v, i = uc // m, uc % m
        first = emb[i] if virtual == 1 else jnp.where(v == 0, emb[i], pending[i])
        x = jnp.where(s == 0, first, recv)
        y = gpt.layer_stack(chunk(params["layers"], v, virtual), x, cos, sin, cfg)
        done = (u >= 0) & (u < virtual * m) & (s == n_stages - 1) & (v == virtual - 1)
        outputs = _put(outputs, i, jnp.where(done, y, outputs[i]))
        recv = jax.lax.ppermute(y, AXIS, ring)
        if virtual > 1:  # stage 0 keeps what came round the ring until its next pass
            u_in = t - (n_stages - 1)
            keep = (s == 0) & (u_in >= 0) & (u_in < (virtual - 1) * m)
            j = jnp.maximum(u_in, 0) % m
            pending = _put(pending, j, jnp.where(keep, recv, pending[j]))
        return (recv, pending, outputs), None

    zeros = jnp.zeros_like(emb)
    pending = zeros if virtual > 1 else zeros[:0]
    init = varying((zeros[0], pending, zeros))
    ticks = virtual * m + n_stages - 1
    (_, _, outputs), _ = jax.lax.scan(tick, init, jnp.arange(ticks))
    losses = jax.lax.map(lambda xy: gpt.head_loss(params, xy[0], xy[1], cfg), (outputs, targets))
    mine = jnp.where(s == n_stages - 1, jnp.mean(losses), 0.0)
    return jax.lax.psum(mine, AXIS)


def _put(buffer, i, value):
    return jax.lax.dynamic_update_index_in_dim(buffer, value, i, 0)
