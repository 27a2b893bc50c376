"""Strong and weak scaling of gpt-small on 1, 2, 4 and 8 simulated CPU devices.

Strong scaling keeps the global batch fixed (16 x 128) and spreads it over more devices;
weak scaling keeps the batch per device fixed (4 x 128) so the global batch grows with them.
Each point compiles through the trainer's one path (`TrainProgram`), and the compiler report
gives its collective bytes by kind, its per-device memory and its predicted step time on the
`cpu` hardware profile. The compiled steps then run round-robin on random-token batches;
a point's measured time is its fastest step (the median is kept too).

The layout is FSDP (`fsdp=N`), not plain data parallelism: both split the batch the same
way, but FSDP also shards the parameters and optimizer state, so what simulated devices can
show (the communication volume, the per-device memory) both change with N: parameter
all-gathers and gradient reduce-scatters grow, and the state per device shrinks as 1/N.
Data parallelism would only show one gradient all-reduce of a fixed size.

Simulated devices share one host's cores and memory, so adding devices adds no compute:
no speedup is expected, and the `cpu` profile predicts wall time on that basis (each device
gets 1/N of the host). What the experiment shows is the communication, the memory and the
overhead of partitioning. Writes experiments/results/scaling.md, scaling.json, scaling.png.

Run: `make scaling` (or `python -m experiments.scaling`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import spmd

if __name__ == "__main__":
    spmd.simulate_cpu_devices(8)

import jax  # noqa: E402

from experiments.strategies import KINDS, measure_all  # noqa: E402
from spmd.compiler import cost, render, report  # noqa: E402
from spmd.compiler.program import TrainProgram, build_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("strong", "weak")
RIGHT = ["ring_bytes", "memory_bytes", "state_bytes"]  # the byte columns after the kinds


def points(devices_list: list[int], batch: int, per_device_batch: int) -> list[dict]:
    """Every (mode, devices, global batch) point of the experiment."""
    return [
        {"mode": mode, "devices": n, "batch": batch if mode == "strong" else per_device_batch * n}
        for mode in MODES
        for n in devices_list
    ]


def prepare(n: int, batch: int, model, seq: int, hw) -> dict:
    """Compile FSDP over the first n devices (the trainer's path), report on it, build its state."""
    spec = f"fsdp={n}"
    layout = spmd.Layout.make(spec, devices=jax.devices()[:n])
    program = TrainProgram.for_tokens(model, layout, batch, seq)
    compiled = program.compile()
    return {
        "model": model,
        "spec": spec,  # as asked: the layout's own spelling of one device is `data=1`
        "compiled": compiled,
        "state": program.init_state(jax.random.key(0)),
        "abstract_batch": program.abstract_batch,
        "report": report.make_report(program, hw, report.stats_from_compiled(compiled)),
        "times": [],
    }


def summarize(point: dict, run: dict, seq: int) -> dict:
    rep = run["report"]
    stats, pred = rep.stats, rep.prediction
    by_kind = {k: 0.0 for k in KINDS}
    for c in stats.collectives:
        by_kind[c.kind] += c.total_bytes
    tokens = point["batch"] * seq
    fastest = min(run["times"])
    return {
        **point,
        "mesh": run["spec"],
        "seq": seq,
        "tokens_per_step": tokens,
        "measured_s": fastest,
        "measured_median_s": statistics.median(run["times"]),
        "measured_tokens_per_s": tokens / fastest,
        "predicted_s": pred.step_time_s,
        "predicted_compute_s": pred.compute_s,
        "predicted_comm_s": pred.exposed_comm_s,
        "predicted_tokens_per_s": pred.tokens_per_s,
        **{f"{k}_bytes": v for k, v in by_kind.items()},
        "collective_bytes": sum(by_kind.values()),
        # The full buffer is the same on any N; what each device sends around the ring,
        # (N-1)/N of it (twice for an all-reduce), is what grows: ring_time at 1 byte/s.
        "ring_bytes": sum(
            c.count * cost.ring_time(c.kind, c.bytes, c.group_size, 1.0) for c in stats.collectives
        ),
        "collective_count": sum(c.count for c in stats.collectives),
        "memory_bytes": stats.memory["total_bytes"],
        "state_bytes": stats.memory["params_bytes"] + stats.memory["opt_state_bytes"],
        "compile_s": run["compiled"].compile_s,
        "timed_steps": len(run["times"]),
    }


def add_relative(rows: list[dict]) -> None:
    """Speedup (strong) or efficiency (weak) against the mode's smallest device count: the
    same ratio, t(first) / t(N), since weak scaling's ideal is a flat step time."""
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["devices"])
        for r in mine:
            r["measured_vs_first"] = mine[0]["measured_s"] / r["measured_s"]
            r["predicted_vs_first"] = mine[0]["predicted_s"] / r["predicted_s"]


def table(rows: list[dict], mode: str) -> list[str]:
    mine = [r for r in rows if r["mode"] == mode]
    kinds = [k for k in KINDS if any(r[f"{k}_bytes"] for r in rows)]
    ratio = "speedup" if mode == "strong" else "efficiency"
    head = ["devices", "mesh", "batch", "measured (min / median)", "tokens/s", "predicted (cpu)",
            f"{ratio} measured / predicted"]  # fmt: skip
    head += [f"{k}/device" for k in kinds] + ["ring sent/device", "memory/device"]
    head += ["params+opt/device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in mine:
        cells = [str(r["devices"]), f"`{r['mesh']}`", f"{r['batch']}x{r['seq']}",
                 f"{_ms(r['measured_s'])} / {_ms(r['measured_median_s'])}",
                 f"{r['measured_tokens_per_s']:,.0f}", _ms(r["predicted_s"]),
                 f"{r['measured_vs_first']:.2f} / {r['predicted_vs_first']:.2f}"]  # fmt: skip
        cells += [render.fmt_bytes(r[k]) for k in [f"{k}_bytes" for k in kinds] + RIGHT]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


STATEMENT = """\
## What simulated devices can and cannot show

The simulated devices share the same {cores} CPU cores and the same memory. Adding devices
cannot add compute: the same FLOPs are split into more, smaller per-device programs that take
turns on those cores, so **no speedup is expected**, and strong scaling's step time stays flat
at best. Weak scaling puts N times the work on the same cores, so its step time grows about
N-fold, and an efficiency near 1/N is the most it can show. The `cpu` profile knows this (each
of N devices gets 1/N of the host's FLOP/s and bandwidth), so its prediction is the
simulation's wall time, not what N real devices would do.

What the experiment can show is the communication volume (the collective bytes per device per
step, read from the compiled program, which are the same on real devices), the per-device
memory (the parameter and optimizer state shrink as 1/N under FSDP), and the overhead of
partitioning: the extra time the partitioned program spends on collectives, which here are
memory copies between threads rather than transfers over a link, and on smaller, less
efficient kernels. It cannot show link bandwidth, overlap of communication with compute, or
the throughput of more chips.
"""


def to_markdown(out: dict) -> str:
    rows, a = out["rows"], out["args"]
    lines = [
        f"# Strong and weak scaling of {a['model']} ({a['set'] or 'preset'}), FSDP, "
        f"simulated CPU devices",
        "",
        f"Run as `{out['command']}` on {out['host_cores']} cores, {out['jax_devices']} "
        f"simulated devices in the process; {a['rounds']} round-robin steps per point.",
        "",
        f"## Strong scaling: global batch {a['batch']}x{a['seq']}",
        "",
        *table(rows, "strong"),
        "",
        f"## Weak scaling: {a['per_device_batch']}x{a['seq']} per device",
        "",
        *table(rows, "weak"),
        "",
        "Measured: the fastest and the median of the timed round-robin steps (the machine is",
        "shared). Predicted: the compiler report's step time on the `cpu` profile. Speedup and",
        "efficiency are t(first point) / t(N). Collective bytes by kind are per device per step",
        "(the full buffer each op works on, the same for every N); ring sent is what each device",
        "sends in a ring, (N-1)/N of that (twice for an all-reduce). XLA:CPU has no",
        "reduce-scatter; the report names its all-reduce + dynamic-slice pattern as one.",
        *_shared_points(rows),
        "",
        STATEMENT.format(cores=out["host_cores"]),
    ]
    return "\n".join(lines)


def _shared_points(rows: list[dict]) -> list[str]:
    """A point both modes share (same devices and batch) is one program, measured once."""
    strong = {(r["devices"], r["batch"]) for r in rows if r["mode"] == "strong"}
    shared = sorted(n for n, b in strong if any(
        r["mode"] == "weak" and (r["devices"], r["batch"]) == (n, b) for r in rows))  # fmt: skip
    if not shared:
        return []
    return [f"The {', '.join(map(str, shared))}-device point of both modes is one compiled "
            f"program, measured once."]  # fmt: skip


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # Strong drawn wider underneath: the modes' byte curves coincide (they depend on the
    # parameters, not the batch), and a thin line on a wide one shows both.
    for mode, color, lw in zip(MODES, ("C0", "C1"), (4, 1.5), strict=True):
        mine = [r for r in rows if r["mode"] == mode]
        n = [r["devices"] for r in mine]
        axes[0].plot(n, [r["measured_s"] for r in mine], "o-", color=color, lw=lw,
                     label=f"{mode}, measured")  # fmt: skip
        axes[0].plot(n, [r["predicted_s"] for r in mine], "s--", color=color, lw=lw,
                     label=f"{mode}, predicted (cpu)")  # fmt: skip
        axes[1].plot(n, [r["collective_bytes"] / 1e6 for r in mine], "o-", color=color, lw=lw,
                     label=f"{mode}, full buffers")  # fmt: skip
        axes[1].plot(n, [r["ring_bytes"] / 1e6 for r in mine], "x:", color=color, lw=lw,
                     label=f"{mode}, ring sent")  # fmt: skip
        axes[2].plot(n, [r["memory_bytes"] / 1e6 for r in mine], "o-", color=color, lw=lw,
                     label=f"{mode}, total")  # fmt: skip
        axes[2].plot(n, [r["state_bytes"] / 1e6 for r in mine], "x:", color=color, lw=lw,
                     label=f"{mode}, params+opt")  # fmt: skip
    labels = [("step time (s)", "step time"), ("MB per device per step", "collective bytes"),
              ("MB per device", "memory per device")]  # fmt: skip
    ticks = sorted({r["devices"] for r in rows})
    for ax, (ylabel, sub) in zip(axes, labels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(d) for d in ticks])
        ax.set(xlabel="simulated devices", ylabel=ylabel, title=sub)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-small")
    p.add_argument("--set", default="", help="model overrides, k=v,...")
    p.add_argument("--devices-list", default="1,2,4,8", help="device counts, comma-separated")
    p.add_argument("--batch", type=int, default=16, help="global batch (strong scaling)")
    p.add_argument("--per-device-batch", type=int, default=4, help="batch per device (weak)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per point")
    p.add_argument("--out", default=str(RESULTS), help="folder for scaling.md/.png/.json")
    return p.parse_args(argv)


def run_points(args) -> list[dict]:
    """Compile each distinct (devices, batch) once, time them all round-robin, summarize."""
    from spmd.models import parse_overrides

    hw = cost.get_hardware("cpu")
    model = build_model(args.model, parse_overrides(args.set), seq=args.seq)
    devices_list = [int(n) for n in args.devices_list.split(",")]
    pts = points(devices_list, args.batch, args.per_device_batch)
    runs: dict[tuple, dict] = {}
    for pt in pts:
        key = (pt["devices"], pt["batch"])
        if key not in runs:
            print(f"compiling {pt['mode']}: fsdp={key[0]}, batch {key[1]}x{args.seq}", flush=True)
            runs[key] = prepare(*key, model, args.seq, hw)
    measure_all(list(runs.values()), args.rounds)
    rows = [summarize(pt, runs[(pt["devices"], pt["batch"])], args.seq) for pt in pts]
    add_relative(rows)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = run_points(args)
    for r in rows:
        print(
            f"{r['mode']:>6} {r['devices']} devices batch {r['batch']:>3}x{r['seq']}  measured "
            f"{r['measured_s']:6.2f} s (median {r['measured_median_s']:6.2f})  predicted "
            f"{r['predicted_s']:6.2f} s  collectives {render.fmt_bytes(r['collective_bytes'])}"
        )
    given = sys.argv[1:] if argv is None else list(argv)
    out = {
        "command": shlex.join(["python", "-m", "experiments.scaling", *given]),
        "host_cores": os.cpu_count(),
        "jax_devices": jax.device_count(),
        "args": vars(args),
        "rows": rows,
    }
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "scaling.md").write_text(to_markdown(out))
    (path / "scaling.json").write_text(json.dumps(out, indent=1))
    title = f"{args.model} ({args.set or 'preset'}), fsdp=N on simulated CPU devices"
    plot(rows, title, path / "scaling.png")
    return out


if __name__ == "__main__":
    main()
