"""Serving throughput: prefill and decode tokens/s by batch size, and achieved memory bandwidth.

A decode step reads every parameter and the whole KV cache (attention covers all S slots,
the unfilled ones masked) to make one id per row. So at small batches a step is bound by
memory, and (parameter bytes + KV bytes) / step time is the figure of merit: how close the
loop comes to the memory system's bandwidth. Greedy, no EOS, so every row runs all steps.

Run: `make bench-inference` (or `python -m experiments.inference --model gpt-small`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "inference.json"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "gpt-small"
    overrides: tuple[tuple[str, str], ...] = ()
    batches: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 64
    new_tokens: int = 64
    mesh: str | None = None  # None: one device
    repeats: int = 3
    seed: int = 0


def kv_bytes(cfg, batch: int, slots: int) -> int:
    """Bytes of K and V that one decode step reads: every layer's whole cache."""
    import jax.numpy as jnp

    per = cfg.n_layers * batch * cfg.n_kv_heads * slots * cfg.head_dim
    return 2 * per * jnp.dtype(cfg.dtype).itemsize


def bench_batch(gen, params, bc: BenchConfig, batch: int) -> dict:
    """Median timings over `repeats` runs, after one run that compiles."""
    from spmd import params as param_lib

    rng = np.random.default_rng(bc.seed)
    prompts = rng.integers(0, 256, (batch, bc.prompt_len)).tolist()
    first = gen.generate(params, prompts)
    runs = [gen.generate(params, prompts) for _ in range(bc.repeats)]
    b, t, n = gen.shapes([bc.prompt_len] * batch)
    prefill_s = statistics.median(r.prefill_s for r in runs)
    decode_s = statistics.median(r.decode_s for r in runs)
    steps = n - 1  # the first id comes out of the prefill
    step_s = decode_s / steps
    param_bytes = param_lib.nbytes(gen.model.specs())
    kv = kv_bytes(gen.cfg, b, t + n - 1)
    return {
        "batch": batch,
        "prompt_len": bc.prompt_len,
        "new_tokens": n,
        "compile_s": first.compile_s,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * bc.prompt_len / prefill_s,
        "decode_s": decode_s,
        "decode_step_ms": 1e3 * step_s,
        "decode_tokens_per_s": batch * steps / decode_s,
        "param_bytes": param_bytes,
        "kv_bytes_per_step": kv,
        "bandwidth_gb_s": (param_bytes + kv) / step_s / 1e9,
    }


def run(bc: BenchConfig) -> list[dict]:
    import jax

    from spmd.inference import Generator, SamplingConfig
    from spmd.layout import Layout
    from spmd.models import get_model

    model = get_model(bc.model, dict(bc.overrides))
    layout = Layout.make(bc.mesh) if bc.mesh else Layout.make("data=1", None, jax.devices()[:1])
    gen = Generator(model, layout, SamplingConfig(max_new_tokens=bc.new_tokens))
    params = gen.prepare(gen.layout.init_params(model.specs(), jax.random.key(bc.seed)))
    return [bench_batch(gen, params, bc, b) for b in bc.batches]


def table(rows: list[dict]) -> str:
    head = f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'step ms':>8} {'GB/s':>7}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['batch']:>5} {r['prefill_tokens_per_s']:>14,.0f}"
            f" {r['decode_tokens_per_s']:>13,.0f}"
            f" {r['decode_step_ms']:>8.2f} {r['bandwidth_gb_s']:>7.2f}"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> tuple[BenchConfig, str, int | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-small")
    p.add_argument("--set", default="", help="override model fields, e.g. n_layers=2")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--mesh", help="e.g. tensor=2 over --devices (default: one device)")
    p.add_argument("--devices", type=int, help="simulate N CPU devices")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    from spmd.models import parse_overrides

    bc = BenchConfig(
        model=a.model,
        overrides=tuple(parse_overrides(a.set).items()),
        batches=tuple(int(b) for b in a.batches.split(",")),
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        mesh=a.mesh,
        repeats=a.repeats,
    )
    return bc, a.out, a.devices


def main(argv: list[str] | None = None) -> int:
    from spmd.errors import SpmdError
    from spmd.mesh import simulate_cpu_devices

    try:
        bc, out, devices = parse(argv)
        if devices:
            simulate_cpu_devices(devices)
        rows = run(bc)
    except SpmdError as e:
        print(f"spmd: error: {e}", file=sys.stderr)
        return 2
    print(f"{bc.model} on {bc.mesh or 'one device'}, prompt {bc.prompt_len}, "
          f"{rows[0]['new_tokens']} new tokens, float32")  # fmt: skip
    print(table(rows))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"config": dataclasses.asdict(bc), "rows": rows}, indent=1))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
