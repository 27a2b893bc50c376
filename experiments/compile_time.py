"""Compile time of the gpt-small train step against depth: the layer scan keeps it flat.

Compiles ahead of time on abstract inputs (nothing is allocated), on fsdp=4,tensor=2 over
8 simulated CPU devices, with the layers scanned and, for contrast, fully unrolled.

Run: `make compile-time` (or `python -m experiments.compile_time --layers 4 32`).
"""

from __future__ import annotations

import argparse

import spmd

if __name__ == "__main__":
    spmd.simulate_cpu_devices(8)

from spmd.compiler.program import TrainProgram  # noqa: E402


def compile_seconds(model_name: str, n_layers: int, unroll: bool, layout, batch=16, seq=128):
    overrides = {"n_layers": n_layers, "scan_unroll": n_layers if unroll else 1}
    model = spmd.get_model(model_name, overrides)
    return TrainProgram.for_tokens(model, layout, batch, seq).compile().compile_s


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-small")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    p.add_argument("--mesh", default="fsdp=4,tensor=2")
    p.add_argument("--no-unrolled", action="store_true", help="skip the unrolled contrast")
    args = p.parse_args(argv)
    layout = spmd.Layout.make(args.mesh)
    rows = []
    print(f"{args.model} train step on {args.mesh}: compile seconds")
    print(f"{'layers':>6} {'scan':>8} {'unrolled':>9}")
    for n in args.layers:
        row = {"layers": n, "scan_s": compile_seconds(args.model, n, False, layout)}
        if not args.no_unrolled:
            row["unrolled_s"] = compile_seconds(args.model, n, True, layout)
        rows.append(row)
        unrolled = f"{row['unrolled_s']:9.1f}" if "unrolled_s" in row else f"{'-':>9}"
        print(f"{n:>6} {row['scan_s']:8.1f} {unrolled}", flush=True)
    return rows


if __name__ == "__main__":
    main()
