"""Steady-state training throughput: spmd's compiled step against plain JAX and PyTorch eager.

All three train the same llama-style model on the same batch on one device (spmd through
`TrainProgram`, exactly what `spmd train` compiles; the baselines in experiments/baselines/:
a careful plain-JAX + optax step and, when torch is installed, a PyTorch eager step). Each
measurement is a fresh process (so its peak RSS is its own): it compiles, warms up, then
times `--steps` steps, blocking once at the end, then times the forward pass (the loss alone)
the same way, so the step splits into forward and backward-plus-update. Rounds alternate spmd,
plain, torch, spmd, ... so load from other jobs hits all alike; the medians and the ratios
are printed and written to experiments/results/bench.json, one entry per case (CASES).

Run: `make bench` (or `python -m experiments.bench`; `--case cpu` for one case).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench.json"
# The CPU comparison of the speed issue: d_model 256, 4 heads x 64, 4 layers, d_ff 1024.
CPU_CASE = "d_model=256,n_layers=4,n_heads=4,n_kv_heads=4,head_dim=64,d_ff=1024,vocab_size=384"
# name -> (preset, overrides): the CPU goal covers both.
# Both on spmd's defaults (auto unrolls these shallow stacks on one CPU device: unroll.py).
CASES = {
    "cpu": ("gpt-tiny", CPU_CASE),
    "gpt-small": ("gpt-small", ""),
}


def worker(program: str, model_name: str, overrides: str, batch: int, seq: int, steps: int):
    """One measurement, in this process: prints one JSON line."""
    import numpy as np

    from spmd.models import get_model, parse_overrides

    cfg = get_model(model_name, parse_overrides(overrides)).cfg
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    run = {"spmd": _spmd_runner, "plain": _plain_runner, "torch": _torch_runner}[program]
    step, forward = run(model_name, overrides, cfg, batch, seq, inputs, targets)
    seconds = _seconds_per_call(step, steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the forward's
    print(json.dumps({"program": program, "tokens_per_s": batch * seq / seconds,
                      "step_s": seconds, "forward_s": _seconds_per_call(forward, steps),
                      "peak_rss_mb": rss}))  # fmt: skip


def _seconds_per_call(fn, calls: int) -> float:
    """Steady-state seconds per call of `fn` (two warm-up calls; one block at the end)."""
    import jax

    for _ in range(2):
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(calls - 1):
        fn()
    jax.block_until_ready(fn())  # a torch tensor is a leaf: returned as is
    return (time.perf_counter() - t0) / calls


def _spmd_runner(model_name, overrides, cfg, batch, seq, inputs, targets):
    import jax

    import spmd
    from spmd.compiler.program import TrainProgram
    from spmd.models import get_model, parse_overrides

    model = get_model(model_name, parse_overrides(overrides))
    layout = spmd.Layout.make("data=1", devices=jax.devices()[:1])
    program = TrainProgram.for_tokens(model, layout, batch, seq)
    compiled = program.compile()
    batch_arrays = {"inputs": inputs, "targets": targets}
    batch_arrays = {
        k: jax.device_put(v, program.batch_shardings[k]) for k, v in batch_arrays.items()
    }
    state = [program.init_state(jax.random.key(0))]
    params = jax.tree.map(jax.numpy.copy, state[0].params)  # the step donates the state's
    forward_loss = jax.jit(layout.traced(model.loss))

    def step():
        state[0], metrics = compiled(state[0], batch_arrays)
        return metrics["loss"]

    return step, lambda: forward_loss(params, batch_arrays)


def _plain_runner(model_name, overrides, cfg, batch, seq, inputs, targets):
    import jax

    from experiments.baselines import plain_jax

    init, train_step = plain_jax.make_step(cfg)
    state = [init(jax.random.key(0))]
    params = jax.tree.map(jax.numpy.copy, state[0][0])
    inputs, targets = jax.device_put(inputs), jax.device_put(targets)
    forward_loss = jax.jit(plain_jax.loss_fn, static_argnums=3)

    def step():
        state[0], loss = train_step(state[0], inputs, targets)
        return loss

    return step, lambda: forward_loss(params, inputs, targets, cfg)


def _torch_runner(model_name, overrides, cfg, batch, seq, inputs, targets):
    import torch

    from experiments.baselines import torch_eager

    model, prepare, train_step = torch_eager.make_step(cfg)
    inputs, targets = prepare(inputs, targets)

    def forward():
        with torch.no_grad():
            return model.loss(inputs, targets)

    return lambda: train_step(inputs, targets), forward


def programs() -> list[str]:
    """spmd and plain JAX always; PyTorch eager when torch is installed (an optional extra)."""
    return ["spmd", "plain"] + (["torch"] if importlib.util.find_spec("torch") else [])


def measure(program, model, overrides, batch, seq, steps) -> dict:
    argv = [sys.executable, "-m", "experiments.bench", "--worker", program, "--model", model,
            "--set", overrides, "--batch", str(batch), "--seq", str(seq),
            "--steps", str(steps)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{program} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    """Measure each case; returns (and writes) {case: summary}."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--model", help="a preset to measure instead of the cases")
    p.add_argument("--set", default="", help="model overrides, k=v,... (with --model)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", choices=["spmd", "plain", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.set, args.batch, args.seq, args.steps)
        return {}
    if args.model:
        cases = {args.model: (args.model, args.set)}
    else:
        cases = CASES if args.case == "all" else {args.case: CASES[args.case]}
    result = {name: run_case(args, model, overrides) for name, (model, overrides) in cases.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def run_case(args, model: str, overrides: str) -> dict:
    runs = {program: [] for program in programs()}
    for _ in range(args.rounds):
        for program in runs:
            runs[program].append(
                measure(program, model, overrides, args.batch, args.seq, args.steps)
            )
    return _summary(args, model, overrides, runs)


def _summary(args, model, overrides, runs) -> dict:
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    print(f"{model} ({overrides or 'preset'}), batch {args.batch}x{args.seq}, one device, "
          f"median of {args.rounds} alternating rounds of {args.steps} steps:")  # fmt: skip
    step_ms = {k: 1e3 * statistics.median(r["step_s"] for r in v) for k, v in runs.items()}
    fwd_ms = {k: 1e3 * statistics.median(r["forward_s"] for r in v) for k, v in runs.items()}
    for k in runs:
        print(f"  {k:6s} {med[k]:9,.0f} tokens/s   peak RSS {rss[k]:7,.0f} MB   step "
              f"{step_ms[k]:6.0f} ms = forward {fwd_ms[k]:5.0f} + backward and update "
              f"{step_ms[k] - fwd_ms[k]:5.0f}")  # fmt: skip
    ratios = {f"spmd/{k}": med["spmd"] / med[k] for k in runs if k != "spmd"}
    names = {"spmd/plain": "plain JAX", "spmd/torch": "PyTorch eager"}
    for key, ratio in ratios.items():
        print(f"  spmd / {names[key]}: {ratio:.2f}x")
    config = {"model": model, "set": overrides, "batch": args.batch, "seq": args.seq,
              "steps": args.steps, "rounds": args.rounds}  # fmt: skip
    return {"config": config, "tokens_per_s": med, "peak_rss_mb": rss, "ratios": ratios,
            "step_ms": step_ms, "forward_ms": fwd_ms, "runs": runs}  # fmt: skip


if __name__ == "__main__":
    main()
