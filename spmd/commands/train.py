"""`spmd train`: train a model on a device mesh.

Every flag is a `TrainConfig` field (`--grad-accum` is `grad_accum`) and takes its default
from there, so the CLI and the Python API cannot drift apart. Three flags read differently
from their field: `--set` fills `overrides`, `--no-progress` clears `progress` and
`--sync-ckpt` clears `async_ckpt`.
"""

from __future__ import annotations

import dataclasses
import sys

from spmd.cli import positive_int
from spmd.models.attention import IMPLEMENTATIONS as ATTENTION
from spmd.models.gpt import DTYPES, REMAT_POLICIES
from spmd.parallel.ring_attention import MODES as CONTEXT_PARALLEL
from spmd.train.config import OPTIMIZERS, OUTER_OPTIMIZERS, TrainConfig

DEFAULTS = TrainConfig()


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on a device mesh")
    field = _field_adder(p)
    field("model", help="a preset name (see `spmd models`)")
    p.add_argument(
        "--set", dest="overrides", default="", help="override model fields, e.g. d_model=256"
    )
    field("mesh", help="e.g. fsdp=4,tensor=2, or auto (the planner's pick)")
    p.add_argument(
        "--devices", type=positive_int, help="simulate N CPU devices (must come before JAX starts)"
    )
    field("steps", type=positive_int)
    field("batch", type=positive_int, help="the global batch, in sequences")
    field("seq", type=positive_int, help="sequence length in tokens")
    field("grad_accum", type=positive_int)
    field("remat", choices=REMAT_POLICIES, help="default: the model's own (none)")
    field("dtype", choices=list(DTYPES), help="compute dtype (default: the model's own)")
    field("attention", choices=ATTENTION, help="attention kernel (default: auto, per backend)")
    field(
        "context_parallel",
        choices=CONTEXT_PARALLEL,
        help="attention when the mesh has sequence > 1 (default: the model's own, ring)",
    )
    field("lr", type=float)
    field("warmup", type=int, help="warm-up steps of the LR schedule")
    field(
        "schedule_steps",
        type=positive_int,
        help="length of the LR schedule (default: --steps; keep it fixed when extending a run)",
    )
    field("seed", type=int)
    field("data", help="a text file, folder, glob or .jsonl (default: Python stdlib)")
    field("tokenizer", help="BPE tokenizer JSON (default: bytes)")
    field("metrics_file", help="write one JSON object per step here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    field("eval_every", type=positive_int, help="eval loss on the validation split")
    field("eval_batches", type=positive_int, help="batches per eval")
    field("tensorboard", metavar="DIR", help="also write TensorBoard logs here")
    field("plot", metavar="FILE", help="write a loss-curve PNG at the end")
    field("ckpt_dir", help="save sharded checkpoints here (asynchronously)")
    field("ckpt_every", type=positive_int, help="steps between saves")
    field("keep", type=positive_int, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid ckpt")
    p.add_argument("--sync-ckpt", action="store_true", help="block on every save (for comparison)")
    field("init_from", metavar="CKPT", help="fine-tune: start from this checkpoint's weights")
    field(
        "pipeline_schedule",
        help="gpipe, 1f1b or interleaved, on a mesh with stage>1 (default: gpipe)",
    )
    field("microbatches", type=positive_int, help="pipeline microbatches per step (default: stage)")
    field(
        "virtual_stages", type=positive_int, help="chunks per stage, interleaved only (default: 2)"
    )
    # Local SGD / DiLoCo (spmd/parallel/local_sgd.py)
    field("optimizer", choices=OPTIMIZERS, help="the (inner) optimizer; sgd: no clipping or decay")
    field("local_steps", type=positive_int, help="local SGD over `data`: sync every H steps")
    field("outer_optimizer", choices=OUTER_OPTIMIZERS, help="avg, or DiLoCo's nesterov")
    field("outer_lr", type=float, help="the outer optimizer's learning rate")
    field("outer_momentum", type=float, help="the outer Nesterov momentum")


def _field_adder(p):
    """`--name` for TrainConfig field `name`, its default taken from the config."""

    def add(name: str, help: str | None = None, **kwargs):
        default, text = getattr(DEFAULTS, name), help or ""
        if default is not None and "default" not in text:
            text += f" (default: {default})"
        p.add_argument("--" + name.replace("_", "-"), default=default, help=text, **kwargs)

    return add


def config_from_args(args) -> TrainConfig:
    from spmd.models import parse_overrides

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(
        overrides=tuple(parse_overrides(args.overrides).items()),
        progress=not args.no_progress,
        async_ckpt=not args.sync_ckpt,
    )
    return TrainConfig(**values)


def run(args) -> int:
    from spmd.train.init_from import resolve
    from spmd.train.outputs import check_output_paths
    from spmd.train.trainer import run

    cfg = resolve(config_from_args(args))  # --mesh auto plans for --init-from's model
    check_output_paths(cfg)  # before anything slow: --mesh auto compiles next
    if cfg.mesh == "auto":  # the planner picks the layout for the devices JAX sees
        from spmd.compiler.planner import plan_mesh_for_train

        mesh = plan_mesh_for_train(
            cfg.model, dict(cfg.overrides), cfg.batch, cfg.seq, cfg.remat, cfg.grad_accum,
            cfg.dtype,
        )  # fmt: skip
        cfg = dataclasses.replace(cfg, mesh=mesh)
    run(cfg, argv=sys.argv[1:])
    return 0
