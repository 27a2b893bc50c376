"""The compiler report as text: the tables `spmd explain` prints."""

from __future__ import annotations

from spmd.compiler.report import Report


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_flops(flops_per_s: float) -> str:
    """TFLOP/s for accelerators, GFLOP/s for a CPU (whose peak would print as 0 TFLOP/s)."""
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:,.0f} TFLOP/s"
    return f"{flops_per_s / 1e9:,.1f} GFLOP/s"


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def render_text(r: Report, top: int = 8) -> str:
    hw = r.hardware
    on = ",".join(f"{a}={n}" for a, n in r.mesh.items() if n > 1) or "data=1"
    every = " ".join(f"{a}={n}" for a, n in r.mesh.items())
    lines = [
        f"{r.model}: {r.params / 1e6:,.1f}M parameters on {r.devices} devices "
        f"({hw.name}: {hw.description})",
        f"mesh      {on}   [{every}]",
        f"batch     {r.batch} x {r.seq} tokens | grad-accum {r.grad_accum} | "
        f"remat {r.remat} | dtype {r.dtype}",
        *_pipeline_lines(r),
        "",
        f"largest parameters ({len(r.param_rows)} in all)",
    ]
    rows = [["name", "shape", "logical axes", "spec", "per device"]]
    for p in r.param_rows[:top]:
        shapes = (_tup(p["shape"]), _tup(p["logical"]), p["spec"], _tup(p["per_device_shape"]))
        rows.append([p["name"], *shapes])
    lines += _table(rows) + [""] + _memory_lines(r) + [""]
    lines.append(
        f"FLOPs per step: {r.stats.flops_per_device:.3e} per device (XLA's count, loop bodies "
        f"x trip count) | model {r.model_flops_per_step:.3e} (6N + causal attention, all devices)"
    )
    lines += ["", "collectives per step, per device (ring time on this hardware)"]
    lines += _collective_lines(r) + [""] + _local_sgd_lines(r) + _prediction_lines(r)
    return "\n".join(lines)


def _pipeline_lines(r: Report) -> list[str]:
    p = r.pipeline
    if p is None:
        return []
    s, m, v = p["stages"], p["microbatches"], p["virtual_stages"]
    formula = f"({s}-1)/({v}x{m}+{s}-1)" if v > 1 else f"({s}-1)/({m}+{s}-1)"
    chunks = f" x {v} virtual stages" if v > 1 else ""
    return [
        f"pipeline  {p['schedule']} over stage={s}{chunks} | {m} microbatches | "
        f"bubble {p['bubble']:.1%} = {formula} (collective-permutes over stage below)"
    ]


def _local_sgd_lines(r: Report) -> list[str]:
    if not r.local_sgd:
        return []
    ls, axes = r.local_sgd, ",".join(r.local_sgd["axes"])
    h = ls["local_steps"]
    return [
        f"local SGD (--local-steps {h}): the collectives above are the inner step's; "
        f"bytes over {axes} per device",
        f"  inner step   {fmt_bytes(ls['inner_step_bytes']):>10}",
        f"  sync step    {fmt_bytes(ls['sync_step_bytes']):>10}  (every {h}th step: the "
        "inner step + the outer update)",
        f"  per step     {fmt_bytes(ls['bytes_per_step']):>10}  amortised over {h} steps",
        "",
    ]


def _memory_lines(r: Report) -> list[str]:
    hw, mem = r.hardware, r.stats.memory
    verdict = "fits" if r.fits else f"DOES NOT FIT (over {hw.usable_memory:.0%} of it)"
    outputs = mem["output_bytes"] - mem["alias_bytes"]
    return [
        f"memory per device (compiled program; {hw.name} has {fmt_bytes(hw.hbm_bytes)})",
        f"  arguments    {fmt_bytes(mem['arguments_bytes']):>10}  = params "
        f"{fmt_bytes(mem['params_bytes'])} + optimizer {fmt_bytes(mem['opt_state_bytes'])}"
        f" + batch {fmt_bytes(mem['batch_bytes'])}",
        f"  temporaries  {fmt_bytes(mem['temp_bytes']):>10}",
        f"  outputs      {fmt_bytes(outputs):>10}  (beyond those aliased to donated arguments)",
        f"  total        {fmt_bytes(mem['total_bytes']):>10}  "
        f"{mem['total_bytes'] / hw.hbm_bytes:.0%} of {fmt_bytes(hw.hbm_bytes)}: {verdict}",
    ]


def _collective_lines(r: Report) -> list[str]:
    groups = r.collective_groups()
    if not groups:
        return ["  none"]
    rows = [["kind", "mesh axes", "count", "bytes", "time", ""]]
    for g in groups:
        note = "(XLA:CPU: all-reduce + dynamic-slice)" if g["raw_kinds"] != [g["kind"]] else ""
        axes = ",".join(g["axes"]) or "-"
        rows.append(
            [g["kind"], axes, str(g["count"]), fmt_bytes(g["bytes"]), fmt_time(g["time_s"]), note]
        )
    return _table(rows)


def _prediction_lines(r: Report) -> list[str]:
    hw, p = r.hardware, r.prediction
    if hw.memory_in_roofline:
        compute = f"compute {fmt_time(p.compute_s)} ({p.bound}-bound roofline)"
        mfu = f"MFU {p.mfu:.1%} (measured peak)"
    else:
        compute = (
            f"compute {fmt_time(p.compute_s)} (matmuls {fmt_time(p.matmul_s)} at "
            f"{hw.matmul_efficiency:.0%} of peak, flash attention {fmt_time(p.attention_s)}, "
            f"elementwise {fmt_time(p.elementwise_s)} at HBM bandwidth)"
        )
        mfu = (
            f"predicted MFU {p.mfu:.1%} (at {hw.matmul_efficiency:.0%} matmul efficiency; "
            f"≤ {p.mfu_at_peak:.1%} at peak)"
        )
    return [
        f"predicted on {hw.name} ({hw.peak_dtype} peak {fmt_flops(hw.peak_flops)}):",
        f"  step {fmt_time(p.step_time_s)} = {compute}",
        f"       + exposed communication {fmt_time(p.exposed_comm_s)} (of "
        f"{fmt_time(p.comm_s)}; {fmt_time(p.blocking_comm_s)} on the critical path)",
        f"  {p.tokens_per_s:,.0f} tokens/s | {mfu}",
    ]


def _tup(x) -> str:
    return "(" + ", ".join(str(v) for v in x) + ")"
