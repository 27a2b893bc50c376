"""Attention implementations on this machine: forward + backward time of each, side by side.

Times `spmd.models.attention.causal_attention` with each implementation that runs on the
backend, on one device, at gpt-small's attention shapes by default (batch 16, 128 tokens,
6 query heads over 2 KV heads of 64). Rounds alternate between the implementations, so load
from other jobs hits them alike; the median of each is printed with its ratio to the
fastest. `attention.CPU_DEFAULT` is the fastest CPU result of this script.

Run: `make bench-attention` (or `python -m experiments.attention`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spmd.models import attention

RESULTS = Path(__file__).parent / "results" / "attention.json"


def implementations() -> list[str]:
    portable = ["einsum", "xla", "blocked"]
    return [*portable, "cudnn"] if jax.default_backend() == "gpu" else portable


def step_fn(impl: str):
    def loss(q, k, v):
        return jnp.sum(attention.causal_attention(q, k, v, impl).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(shape, dtype: str, rounds: int) -> dict[str, list[float]]:
    b, t, h, g, k = shape
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, h, k)), dtype)
    kv = [jnp.asarray(rng.standard_normal((b, t, g, k)), dtype) for _ in range(2)]
    fns = {impl: step_fn(impl) for impl in implementations()}
    for fn in fns.values():
        jax.block_until_ready(fn(q, *kv))  # compile
    times = {impl: [] for impl in fns}
    for _ in range(rounds):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, *kv))
            times[impl].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,128,6,2,64", help="batch,tokens,heads,kv_heads,dim")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    times = measure(shape, args.dtype, args.rounds)
    medians = {impl: statistics.median(ts) for impl, ts in times.items()}
    best = min(medians.values())
    print(f"causal attention fwd+bwd on {jax.devices()[0].device_kind}, shape {shape}, "
          f"{args.dtype}, median of {args.rounds}:")  # fmt: skip
    for impl, m in sorted(medians.items(), key=lambda kv: kv[1]):
        print(f"  {impl:8s} {m * 1e3:8.2f} ms  {m / best:5.2f}x the fastest")
    result = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "shape": shape,
        "dtype": args.dtype,
        "median_s": medians,
        "fastest": min(medians, key=medians.get),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
