"""`spmd plan`: search mesh layouts (and remat, grad-accum) for a model, ranked by speed."""

from __future__ import annotations

from spmd.cli import positive_int

# It compiles on simulated devices only: never join a multi-process job.
RUNS_JAX = False


def add_parser(sub) -> None:
    from spmd.commands.explain import add_model_flags

    p = sub.add_parser("plan", help="search mesh layouts and rank them by predicted step time")
    add_model_flags(p)
    p.add_argument("--top", type=positive_int, default=5, help="plans to show")
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "compile", "analytic"],
        help="auto: compile the best analytic candidates when the devices can be simulated",
    )
    p.add_argument(
        "--compile-top", type=positive_int, default=3, help="fitting compiled plans to find"
    )
    p.add_argument("--no-cache", action="store_true", help="ignore cached compiles")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args) -> int:
    import json

    from spmd.commands.explain import warn_on_dtype
    from spmd.compiler import cost, planner
    from spmd.models import parse_overrides

    hw = cost.get_hardware(args.hardware)  # a bad name fails before JAX starts
    devices = args.devices or _jax_devices()
    p = planner.plan(
        args.model,
        devices,
        args.hardware,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        overrides=parse_overrides(args.overrides),
        compile_top=args.compile_top,
        method=args.method,
        use_cache=not args.no_cache,
        progress=not args.json,
    )
    warn_on_dtype(hw, p.dtype)
    if args.json:
        print(json.dumps(p.to_json(args.top), indent=2))
    else:
        _print_text(p, hw, args.top)
    return 0


def _print_text(p, hw, top: int) -> None:
    print(
        f"{p.model} on {p.devices} x {hw.name}: batch {p.batch} x {p.seq} | {p.n_candidates} "
        f"candidates, {p.n_analytic_fit} fit the analytic memory model, {p.n_compiled} compiled "
        f"| {p.wall_s:.0f}s"
    )
    rows = _table_rows(p, top)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    best = p.best.candidate
    how = (
        f"scored on its compiled program; {p.why}"
        if p.method == "compiled"
        else f"scored by the ANALYTIC estimate, not compiled: {p.why}"
    )
    pipe = ""
    if best.microbatches:
        pipe = f" --pipeline-schedule 1f1b --microbatches {best.microbatches}"
    print(
        f"best: --mesh {best.spec} --remat {best.remat} --grad-accum {best.grad_accum}{pipe}"
        f"  ({how})"
    )


def _table_rows(p, top: int) -> list[list[str]]:
    from spmd.compiler.render import fmt_bytes, fmt_time

    # The prediction runs matmuls at the profile's achieved efficiency, attention and
    # elementwise work at theirs (spmd.compiler.cost): a prediction, not a bound.
    eff = f"MFU ({p.hardware.matmul_efficiency:.0%} mm)"
    head = ["#", "mesh", "remat", "accum", "1f1b M", "memory/device", "step", "tokens/s", eff]
    rows = [[*head, "method"]]
    for i, s in enumerate(p.ranked[:top], 1):
        c, pr = s.candidate, s.prediction
        rows.append(
            [
                str(i),
                c.spec,
                c.remat,
                str(c.grad_accum),
                str(c.microbatches or "-"),
                fmt_bytes(s.memory_bytes),
                fmt_time(pr.step_time_s),
                f"{pr.tokens_per_s:,.0f}",
                f"{pr.mfu:.1%}",
                s.method,
            ]
        )
    return rows


def _jax_devices() -> int:
    import jax

    return jax.device_count()
