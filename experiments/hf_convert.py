"""What converting a Hugging Face Llama checkpoint costs: time and peak host memory, each way.

A random Llama of a preset's shape (gpt-350m by default, float32) is written as transformers
would (config.json, 1 GB safetensors shards and their index); then `spmd convert hf-to-spmd`
and `spmd convert spmd-to-hf --max-shard-size 1GB` each run in a fresh process on one CPU
device. The peak resident memory is that process's own (`wait4`'s ru_maxrss), beside the
model's size and its largest tensor.

    make bench-convert
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "hf_convert.json"


def write_random_llama(folder: Path, cfg, shard_bytes: int) -> dict:
    """A Llama safetensors folder with cfg's shapes and random float32 weights."""
    from spmd.interop import hf_config
    from spmd.interop.hf_names import tensor_maps
    from spmd.interop.safetensors_io import ShardedWriter
    from spmd.models import gpt

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs, writer, largest = gpt.param_specs(cfg), ShardedWriter(folder, shard_bytes), 0
    for m in tensor_maps(cfg.tie_embeddings):
        spec = specs
        for key in m.path:
            spec = spec[key]
        shape = m.hf_shape(spec.shape[1:] if m.layered else spec.shape)
        for name in m.hf_names(cfg.n_layers):
            tensor = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
            writer.add(name, tensor)
            largest = max(largest, tensor.nbytes)
    writer.close()
    config = hf_config.from_gpt(cfg, None, "float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"model_bytes": writer.total, "largest_tensor_bytes": largest}


def timed(argv: list[str]) -> dict:
    """Wall seconds and the process's own peak RSS for `spmd ARGV` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "spmd.cli", *argv], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"spmd {' '.join(argv)} failed")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def run(model: str = "gpt-350m", overrides: dict | None = None, workdir=None) -> dict:
    from spmd.models import get_model

    cfg = get_model(model, overrides or {}).cfg
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        sizes = write_random_llama(root / "hf", cfg, 10**9)
        into = timed(["convert", "hf-to-spmd", "--hf-dir", str(root / "hf"), "--out",
                      str(root / "ck")])  # fmt: skip
        out = timed(["convert", "spmd-to-hf", "--ckpt", str(root / "ck"), "--out",
                     str(root / "back"), "--max-shard-size", "1GB"])  # fmt: skip
    mb = {k.replace("_bytes", "_mb"): round(v / 1e6, 1) for k, v in sizes.items()}
    return {"model": model, "overrides": overrides or {}, **mb, "hf_to_spmd": into,
            "spmd_to_hf": out}  # fmt: skip


def report(r: dict) -> str:
    lines = [f"{r['model']}: {r['model_mb']} MB of float32 weights, largest tensor "
             f"{r['largest_tensor_mb']} MB"]  # fmt: skip
    for way in ("hf_to_spmd", "spmd_to_hf"):
        x = r[way]
        lines.append(f"  {way:<11} {x['seconds']:7.1f} s   peak RSS {x['peak_rss_mb']:8.1f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from spmd.models import parse_overrides

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-350m")
    p.add_argument("--set", default="", help="model field overrides, e.g. n_layers=2")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    result = run(args.model, parse_overrides(args.set))
    print(report(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
