"""Local SGD / DiLoCo against synchronous data parallel: eval loss per step and per byte.

gpt-small on the Python standard library's source (the `make train` corpus), data=4 workers
(each an fsdp=2 pair of the 8 simulated CPU devices). One synchronous data-parallel run
(AdamW on the averaged gradient every step) is the reference; then local SGD with inner AdamW
and DiLoCo's outer Nesterov SGD at H = 1, 4 and 16. Every run is the real `spmd train` loop
(`spmd.train.trainer.run`) with the same seed, batches and schedule, evaluated on the same
held-out batches every `eval_every` steps (a multiple of every H, so right after a sync).

Bytes are per device over the `data` axis, read from the compiled programs (the compiler
report's collective parsing): synchronous DP moves its gradient all-reduce every step; local
SGD's inner step moves nothing over `data` and its sync step the parameter delta's
all-reduce, so H steps cost one sync. Losses and bytes are deterministic; wall time on this
shared 2-core machine is not, and is not reported.

Writes experiments/results/local_sgd.md, local_sgd.png and local_sgd.json.
Run: `make local-sgd` (or `python -m experiments.local_sgd`); about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import spmd

if __name__ == "__main__":
    spmd.simulate_cpu_devices(8)

from spmd.compiler import hlo  # noqa: E402
from spmd.compiler.program import TrainProgram  # noqa: E402
from spmd.compiler.report import local_sgd_comm  # noqa: E402
from spmd.parallel.local_sgd import LocalSGDConfig  # noqa: E402
from spmd.train import trainer  # noqa: E402
from spmd.train.config import TrainConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def base_config(args) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        overrides=tuple(kv.split("=", 1) for kv in args.set.split(",") if kv),
        mesh=args.mesh,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        lr=args.lr,
        warmup=args.warmup,
        data=args.data,
        progress=False,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
    )


def data_bytes(cfg: TrainConfig, local: LocalSGDConfig | None) -> dict:
    """Bytes per device over `data` of each compiled step (the trainer's own programs)."""
    model = cfg.build_model()
    layout = spmd.Layout.make(cfg.mesh)
    program = TrainProgram.for_tokens(
        model, layout, cfg.batch, cfg.seq, optimizer=cfg.optimizer_config(), local=local
    )
    compiled = program.compile()
    if local:
        return local_sgd_comm(compiled)
    cols = hlo.collectives(compiled.executable.as_text(), layout.shape)
    return {"step_bytes": hlo.bytes_over(cols, ("data",))}


def bytes_after(step: int, h: int | None, comm: dict) -> float:
    """Cumulative bytes over `data` after `step` steps."""
    if h is None:
        return step * comm["step_bytes"]
    syncs = step // h
    return (step - syncs) * comm["inner_step_bytes"] + syncs * comm["sync_step_bytes"]


def train(cfg: TrainConfig, folder: Path) -> list[dict]:
    metrics = folder / f"metrics-{cfg.local_steps or 'sync'}.jsonl"
    trainer.run(dataclasses.replace(cfg, metrics_file=str(metrics)))
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def run_all(args) -> list[dict]:
    base = base_config(args)
    sync_comm = data_bytes(base, None)
    local_comm = data_bytes(base, LocalSGDConfig(1, "nesterov", args.outer_lr, args.outer_momentum))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for h in [None, *args.local_steps]:
            cfg = dataclasses.replace(base, local_steps=h)
            rows = train(cfg, Path(tmp))
            comm = sync_comm if h is None else local_comm
            evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
            runs.append(
                {
                    "name": "synchronous DP" if h is None else f"DiLoCo H={h}",
                    "local_steps": h,
                    "bytes_per_step": bytes_after(args.steps, h, comm) / args.steps,
                    "eval_steps": [s for s, _ in evals],
                    "eval_loss": [e for _, e in evals],
                    "eval_bytes": [bytes_after(s, h, comm) for s, _ in evals],
                    "final_train_loss": rows[-1]["loss"],
                }
            )
            print(f"{runs[-1]['name']}: eval loss {evals[-1][1]:.4f}", flush=True)
    return runs


def to_markdown(runs: list[dict], args) -> str:
    ref = runs[0]
    lines = [
        "# Local SGD / DiLoCo against synchronous data parallel",
        "",
        f"{args.model} on the {args.data or 'Python stdlib'} corpus, mesh {args.mesh} (the "
        f"workers are the data=4 slices), batch {args.batch} x {args.seq} tokens, {args.steps} "
        f"steps, inner AdamW lr {args.lr} (warm-up {args.warmup}, cosine), outer Nesterov SGD "
        f"lr {args.outer_lr} momentum {args.outer_momentum}. Eval loss on {args.eval_batches} "
        f"held-out batches every {args.eval_every} steps. Bytes: per device over `data`, "
        "read from the compiled programs (`python -m experiments.local_sgd`).",
        "",
        "| run | bytes over data per step | vs synchronous | final eval loss | vs synchronous |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['name']} | {r['bytes_per_step'] / 1e6:.3f} MB | "
            f"{r['bytes_per_step'] / ref['bytes_per_step']:.3f}x | {r['eval_loss'][-1]:.4f} | "
            f"{r['eval_loss'][-1] - ref['eval_loss'][-1]:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        by_step.plot(r["eval_steps"], r["eval_loss"], marker="o", label=r["name"])
        by_bytes.plot([b / 1e6 for b in r["eval_bytes"]], r["eval_loss"], marker="o")
    by_step.set(xlabel="step", ylabel="eval loss", title="eval loss vs steps")
    by_bytes.set(xlabel="MB sent over data per device (cumulative)", title="vs bytes")
    by_bytes.set_xscale("symlog", linthresh=1.0)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-small")
    p.add_argument("--set", default="", help="model overrides, k=v,...")
    p.add_argument("--mesh", default="data=4,fsdp=2")
    p.add_argument("--data", help="default: the Python stdlib (as `make train`)")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--local-steps", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--eval-every", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS), help="folder for local_sgd.md/.png/.json")
    args = p.parse_args(argv)
    runs = run_all(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "local_sgd.md").write_text(to_markdown(runs, args))
    (out / "local_sgd.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    plot(runs, out / "local_sgd.png")
    print(to_markdown(runs, args))
    return runs


if __name__ == "__main__":
    main()
