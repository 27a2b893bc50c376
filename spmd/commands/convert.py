"""`spmd convert`: Hugging Face Llama checkpoints to spmd checkpoints and back."""

from __future__ import annotations

import argparse
import time

from spmd.cli import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face Llama checkpoints in and out")
    ways = p.add_subparsers(dest="direction", required=True)
    into = ways.add_parser("hf-to-spmd", help="a Llama safetensors folder -> an spmd checkpoint")
    into.add_argument("--hf-dir", required=True, help="config.json and *.safetensors")
    into.add_argument("--out", required=True, help="the new checkpoint folder")
    out = ways.add_parser("spmd-to-hf", help="an spmd checkpoint -> a Llama safetensors folder")
    out.add_argument("--ckpt", required=True, help="a checkpoint folder (converted or trained)")
    out.add_argument("--out", required=True, help="the new folder for config.json and weights")
    out.add_argument("--step", type=int, help="the checkpoint step (default: the newest valid)")
    out.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights' dtype (default: the original checkpoint's, else float32)",
    )
    out.add_argument(
        "--max-shard-size", type=byte_size, default="5GB", help="largest file (default: 5GB)"
    )
    for q in (into, out):
        q.add_argument("--mesh", help="read onto this mesh over all devices (default: one device)")
        q.add_argument("--devices", type=positive_int, help="simulate N CPU devices")


UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def byte_size(text: str) -> int:
    """argparse type: `5GB`, `200MB`, `100KB` (as transformers' max_shard_size) or bytes."""
    upper = text.strip().upper()
    unit = next((u for u in UNITS if upper.endswith(u)), "B")
    try:
        value = float(upper.removesuffix(unit)) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 200MB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(value)


def run(args) -> int:
    import jax

    from spmd.interop import hf
    from spmd.layout import Layout

    t0 = time.perf_counter()
    layout = Layout.make(args.mesh) if args.mesh else Layout.make("data=1", None, jax.devices()[:1])
    if args.direction == "hf-to-spmd":
        done = hf.hf_to_spmd(args.hf_dir, args.out, layout)
        carried = f", with {hf.TOKENIZER}" if done["tokenizer"] else ""
        what = f"{args.hf_dir} -> {args.out} (step 0{carried})"
    else:
        done = hf.spmd_to_hf(
            args.ckpt, args.out, layout, args.step, args.dtype, args.max_shard_size
        )
        what = f"{args.ckpt} -> {args.out} ({len(done['files'])} files, {done['dtype']})"
    print(f"converted {done['params']:,} parameters: {what} in {time.perf_counter() - t0:.1f}s")
    return 0
