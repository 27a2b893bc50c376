"""float32 GEMM throughput on this CPU: XLA (what every JAX step's matmuls run on) against
PyTorch's (what `make bench`'s eager baseline runs on), at the shapes of gpt-small's dense
layers: the forward x @ W, the input gradient dY @ W^T and the weight gradient X^T @ dY.

The matmuls are most of a training step's time on either side (about two thirds of
PyTorch's in `make bench`), so their ratio bounds what spmd can reach against PyTorch eager
with XLA:CPU's kernels. In one process, alternating JAX and torch per shape, best of
`--rounds` (the least disturbed by other jobs); written to experiments/results/gemm.json.

Run: `make bench-gemm` (or `python -m experiments.gemm`). Without torch it times XLA alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).parent / "results" / "gemm.json"
# gpt-small: 16 x 128 = 2048 rows, d_model 384, d_ff 1152, kv heads x head_dim = 128.
# (name, m, k, n, transpose_lhs): the product is (m, k) @ (k, n); transpose_lhs stores the
# left operand as (k, m), as a weight gradient's activations are.
SHAPES = [
    ("mlp up, forward", 2048, 384, 1152, False),
    ("mlp down, forward", 2048, 1152, 384, False),
    ("q/o projection", 2048, 384, 384, False),
    ("k/v projection", 2048, 384, 128, False),
    ("mlp up, weight gradient", 384, 2048, 1152, True),
    ("mlp down, weight gradient", 1152, 2048, 384, True),
]


def _seconds(fn, calls: int) -> float:
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(calls - 1):
        fn()
    jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / calls


def measure(m: int, k: int, n: int, transpose_lhs: bool, calls: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if transpose_lhs else (m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    matmul = jax.jit((lambda x, y: x.T @ y) if transpose_lhs else jnp.matmul)
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    programs = {"xla": lambda: matmul(xa, xb)}
    if importlib.util.find_spec("torch"):
        # As the eager baseline sets it (before OpenMP starts): spinning waits collapse on
        # a shared machine.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        programs["torch"] = (lambda: ta.T @ tb) if transpose_lhs else (lambda: ta @ tb)
    best = dict.fromkeys(programs, float("inf"))
    for _ in range(rounds):
        for name, fn in programs.items():
            best[name] = min(best[name], _seconds(fn, calls))
    return {name: 2 * m * k * n / s / 1e9 for name, s in best.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=30, help="matmuls per timing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scale", type=int, default=1, help="divide every dimension by this")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    rows = []
    print("float32 GEMM, GFLOP/s (best of rounds):")
    for name, m, k, n, transpose_lhs in SHAPES:
        m, k, n = (x // args.scale for x in (m, k, n))
        gflops = measure(m, k, n, transpose_lhs, args.calls, args.rounds)
        ratio = gflops["xla"] / gflops["torch"] if "torch" in gflops else None
        rows.append({"case": name, "m": m, "k": k, "n": n, "gflops": gflops, "xla/torch": ratio})
        shown = "   ".join(f"{p} {v:6.0f}" for p, v in gflops.items())
        tail = f"   xla/torch {ratio:.2f}x" if ratio else ""
        print(f"  {name:26s} {m}x{k}x{n}:  {shown}{tail}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rounds": args.rounds, "shapes": rows}, indent=1))
    return {"shapes": rows}


if __name__ == "__main__":
    main()
