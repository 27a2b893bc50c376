"""Pipeline parallelism over the mesh axis `stage`: GPipe, 1F1B and interleaved schedules.

The stacked layer dimension (logical axis `layers`) is split over `stage`, so stage s holds
layers [s*L/S, (s+1)*L/S) as its shard of the ordinary, canonical parameter arrays (a
checkpoint restores onto a mesh without `stage` unchanged). The train step's loss and
gradients then run inside a `jax.shard_map` that is manual over `stage` only: the other
axes (data, fsdp, tensor, ...) stay automatic, so the model's own sharding constraints keep
working inside a stage. Activations move between neighbouring stages with `ppermute`.

Schedules (S stages, M microbatches, V virtual stages per device):
- gpipe (circular.py): every microbatch runs forward through all stages (M+S-1 ticks),
  then autodiff runs the same loop backward. Live activations: the residuals of all ticks.
- interleaved: device s holds V chunks, virtual stages s, S+s, 2S+s, ... (round robin); a
  microbatch circles the ring V times (VM+S-1 ticks of a V-th of the work each), so the
  bubble shrinks by about V. Backward by autodiff, as gpipe (circular.py, V > 1).
- 1f1b: a hand-written loop (one_f_one_b.py) in which each tick does one
  forward and one backward; live activations are bounded by 2S-1 stage inputs, not M.

Placement of the embedding and the head: both stay replicated over `stage` (stored as the
rules say, split only over fsdp/tensor) and every stage computes them, masked, keeping only
the first stage's embedding and the last stage's loss. The alternative, a `lax.cond` on the
stage index, puts the head's fsdp/tensor collectives inside a branch; the masked form keeps
one straight-line SPMD program. The cost is the head's FLOPs on every stage (S-1 redundant
copies), measured at 6% of a device's FLOPs for a small model in README's "Pipeline
parallelism"; for a large vocabulary on many stages it is the first thing to move.

This module holds the configuration, its checks and the dispatch; stages.py what the
schedules share.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from spmd.errors import SpmdError
from spmd.models import Model, gpt
from spmd.parallel import circular, one_f_one_b
from spmd.parallel.stages import AXIS

SCHEDULES = ("gpipe", "1f1b", "interleaved")


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
    # The schedules run gpt's dense blocks and its own untied head; an MoE model (a GPTConfig
    # too, but with router metrics) and ring attention (a second shard_map) are not built in.
    if not isinstance(model.cfg, gpt.GPTConfig) or model.has_aux:
        raise SpmdError(
            f"stage={n_stages} (pipeline parallelism) needs a dense gpt model, not {model.name!r}"
        )
    if model.cfg.tie_embeddings:
        raise SpmdError(f"stage={n_stages} (pipeline parallelism) needs untied embeddings")
    if layout.shape["sequence"] > 1:
        raise SpmdError(
            f"stage={n_stages} and sequence={layout.shape['sequence']} together are not "
            "supported: the pipeline does not run context-parallel attention"
        )
    if model.cfg.attention == "splash":  # auto picks a portable form inside the pipeline
        raise SpmdError(
            f"stage={n_stages} and attention=splash together are not supported: the kernel's "
            "shard_map cannot nest in the pipeline's; use --attention auto, einsum, xla or blocked"
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
        return functools.partial(
            one_f_one_b.value_and_grad, cfg=model.cfg, microbatches=pipe.microbatches
        )
    loss = functools.partial(
        circular.loss, cfg=model.cfg, microbatches=pipe.microbatches, virtual=pipe.virtual_stages
    )
    return jax.value_and_grad(loss)
