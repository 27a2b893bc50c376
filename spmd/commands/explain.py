"""`spmd explain`: the compiler report for a model on a mesh, before any step runs."""

from __future__ import annotations

import sys

from spmd.cli import positive_int
from spmd.models.attention import IMPLEMENTATIONS as ATTENTION
from spmd.models.gpt import DTYPES, REMAT_POLICIES
from spmd.parallel.ring_attention import MODES as CONTEXT_PARALLEL

# It compiles on simulated devices only: never join a multi-process job.
RUNS_JAX = False


def add_parser(sub) -> None:
    p = sub.add_parser(
        "explain", help="per-device memory, FLOPs and collectives of a train step, before it runs"
    )
    add_model_flags(p)
    p.add_argument("--mesh", default="data=-1", help="e.g. fsdp=4,tensor=2 (default: data=-1)")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="default: the model's own (none)")
    p.add_argument("--attention", choices=ATTENTION, help="attention kernel (default: auto)")
    p.add_argument(
        "--context-parallel", choices=CONTEXT_PARALLEL, help="with sequence > 1 (default: ring)"
    )
    p.add_argument("--grad-accum", type=positive_int, default=1)
    add_pipeline_flags(p)
    p.add_argument(
        "--local-steps",
        type=positive_int,
        help="local SGD over data: report the inner step and the bytes over data per step",
    )
    p.add_argument("--top", type=positive_int, default=8, help="largest parameters to list")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--hlo", metavar="FILE", help="also write the compiled per-device HLO here")


def add_pipeline_flags(p) -> None:
    """`spmd train`'s pipeline flags (TrainConfig fields), for a mesh with stage>1."""
    p.add_argument("--pipeline-schedule", help="gpipe, 1f1b or interleaved (default: gpipe)")
    p.add_argument("--microbatches", type=positive_int, help="default: stage")
    p.add_argument("--virtual-stages", type=positive_int, help="interleaved (default: 2)")


def add_model_flags(p) -> None:
    """Flags shared with `spmd plan`."""
    p.add_argument("--model", default="gpt-tiny", help="a preset name (see `spmd models`)")
    p.add_argument("--set", dest="overrides", default="", help="override model fields, k=v,...")
    p.add_argument(
        "--devices",
        type=positive_int,
        help="simulate N CPU devices (any N: only compilation happens)",
    )
    p.add_argument(
        "--batch", type=positive_int, help="global batch in sequences (default: max(8, devices))"
    )
    p.add_argument("--seq", type=positive_int, default=128, help="sequence length in tokens")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: the model's)")
    p.add_argument(
        "--hardware",
        default="cpu",
        help="profile for memory and time: cpu, a100, h100, h200, tpu-v4, tpu-v5e, tpu-v5p",
    )


def warn_on_dtype(hw, dtype: str) -> None:
    """One line on stderr when the profile's peak is for another dtype (shared with plan).
    Printed with the prediction, not before the work, so a failure stays one line."""
    from spmd.compiler import cost

    if warning := cost.dtype_warning(hw, dtype):
        print(f"spmd: warning: {warning}", file=sys.stderr)


def run(args) -> int:
    from spmd.compiler import cost, render, report
    from spmd.errors import SpmdError
    from spmd.models import parse_overrides
    from spmd.train.config import TrainConfig
    from spmd.train.outputs import check_output_file

    hw = cost.get_hardware(args.hardware)  # a bad name fails before JAX starts
    if args.mesh == "auto":
        raise SpmdError("spmd explain needs an explicit --mesh; spmd plan shows what auto picks")
    if args.hlo:  # written after compiling: a bad path must fail before
        check_output_file("--hlo", args.hlo, "step.hlo", make_parents=False)
    rep = report.explain(
        args.model,
        mesh=args.mesh,
        batch=args.batch,
        seq=args.seq,
        hardware=args.hardware,
        remat=args.remat,
        grad_accum=args.grad_accum,
        dtype=args.dtype,
        attention=args.attention,
        context_parallel=args.context_parallel,
        overrides=parse_overrides(args.overrides),
        hlo_path=args.hlo,
        pipeline=TrainConfig(
            pipeline_schedule=args.pipeline_schedule,
            microbatches=args.microbatches,
            virtual_stages=args.virtual_stages,
        ).pipeline(),
        local_steps=args.local_steps,
    )
    warn_on_dtype(hw, rep.dtype)
    print(report.dumps(rep) if args.json else render.render_text(rep, args.top))
    return 0
