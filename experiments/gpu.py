"""The GPU table: spmd's own train step on one accelerator, measured against its prediction.

Each case (a model preset with overrides, batch, seq, remat, compute dtype) is compiled
through `TrainProgram.compile`, the path training uses, on a one-device `data=1` layout. A
case whose compiled program needs more memory than the device has, or whose compile or run
fails with XLA's RESOURCE_EXHAUSTED, is recorded as "out of memory: needs X GB" rather than
ending the run. The others run warm-up steps and then `--steps` timed steps, blocking on the
loss each step; the median step gives TFLOP/s and MFU (the one FLOPs convention of
spmd.compiler.cost), set beside the compiler report's predicted step time and MFU.

Every case runs in a fresh process, so its peak memory is its own and an out-of-memory
failure cannot poison the next case's allocator. This parent process never starts JAX: on a
GPU that would take the memory the cases need. Each finished case is appended to
`gpu.jsonl` and `gpu.md` is rewritten, so a run cut short keeps what it measured.

Nothing here or in what a case imports loads the optional heavy packages (plotting,
tensorboard, data loaders, tokenizers, checkpointing); each row lists any that were loaded
(`heavy_modules`), so the tests check it.

Run: `make bench-gpu` (or `python -m experiments.gpu [--cases A,B] [--steps 8]`).
On CPU, `--tiny` runs a tiny preset (what the tests do).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
WARMUP = 2  # the first step also pays for autotuning and allocation; the second, to be safe
HEAVY = ("matplotlib", "tensorboardX", "grain", "tokenizers", "orbax")
RESULT_TAG = "GPU-BENCH-ROW "  # marks the worker's one result line among JAX's own output


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str
    overrides: tuple[tuple[str, Any], ...]
    batch: int
    seq: int
    remat: str
    dtype: str

    def describe(self) -> dict:
        return {
            "case": self.name,
            "model": self.model,
            "overrides": dict(self.overrides),
            "batch": self.batch,
            "seq": self.seq,
            "remat": self.remat,
            "dtype": self.dtype,
        }


# The speed issue's table: gpt-1b and the Llama-7B shape cut to 8 layers (so its remat=none
# run has a chance to fit one H200), bf16 compute with fp32 parameters and Adam, seq 2048.
GPU_CASES = (
    Case("gpt-1b-b16-dots", "gpt-1b", (), 16, 2048, "dots", "bfloat16"),
    Case("gpt-1b-b8-none", "gpt-1b", (), 8, 2048, "none", "bfloat16"),
    Case("llama-7b-8l-b8-dots", "llama-7b", (("n_layers", 8),), 8, 2048, "dots", "bfloat16"),
    Case("llama-7b-8l-b8-none", "llama-7b", (("n_layers", 8),), 8, 2048, "none", "bfloat16"),
    # The baseline, attention materialized as before the attention entry point, and
    # the remat policy that keeps only the attention activations.
    Case(
        "gpt-1b-b16-dots-einsum", "gpt-1b", (("attention", "einsum"),), 16, 2048, "dots", "bfloat16"
    ),
    Case("gpt-1b-b8-attention", "gpt-1b", (), 8, 2048, "attention", "bfloat16"),
)
# Seconds on a CPU: the same code path as the GPU cases, for the tests.
TINY = (("n_layers", 2),)
TINY_CASES = (
    Case("tiny-dots", "gpt-tiny", TINY, 4, 64, "dots", "float32"),
    Case("tiny-none", "gpt-tiny", TINY, 4, 64, "none", "float32"),
)
ALL_CASES = {c.name: c for c in (*GPU_CASES, *TINY_CASES)}


# --- one case, inside its worker process ---------------------------------------------------


def measure(case: Case, steps: int, memory_limit: float | None = None) -> dict:
    """One case's row: compile, check memory, run and time; an OOM becomes a row too."""
    row = {**case.describe(), **device_info()}
    compiled_bytes = None
    try:
        program, compiled, stats = compile_case(case)
        compiled_bytes = stats.memory["total_bytes"]
        row.update(compiled_bytes=compiled_bytes, compile_s=compiled.compile_s)
        row.update(prediction(program, stats))
        limit = memory_limit or row["memory_limit_bytes"]
        if limit and compiled_bytes > limit:
            return out_of_memory(row, compiled_bytes, f"compiled program needs more than {limit}")
        row.update(time_steps(program, compiled, steps))
    except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; the rest re-raises
        if not is_oom(e):
            raise
        return out_of_memory(row, compiled_bytes or bytes_in_message(str(e)), str(e))
    row["status"] = "ok"
    row["heavy_modules"] = sorted(m for m in HEAVY if m in sys.modules)
    return row


def compile_case(case: Case):
    import jax

    from spmd.compiler import report
    from spmd.compiler.program import TrainProgram, build_model
    from spmd.layout import Layout

    model = build_model(
        case.model, dict(case.overrides), remat=case.remat, dtype=case.dtype, seq=case.seq
    )
    layout = Layout.make("data=1", devices=jax.devices()[:1])
    program = TrainProgram.for_tokens(model, layout, case.batch, case.seq)
    compiled = program.compile()
    return program, compiled, report.stats_from_compiled(compiled)


def prediction(program, stats) -> dict:
    """What `spmd explain` predicts for this device (the CPU profile where spmd has none),
    and the model FLOPs that every MFU here is computed from."""
    from spmd.compiler import cost, report
    from spmd.models.attention import resolve

    hw = cost.hardware_of_devices()
    if program.layout.mesh.devices.flat[0].platform != "cpu":
        stats = report.stats_from_compiled(on_host(program).compile())
    predicted = report.make_report(program, hw or cost.get_hardware("cpu"), stats).prediction
    batch, seq = program.shapes["inputs"]
    return {
        "hardware": hw.name if hw else None,
        "peak_tflops": hw.peak_flops / 1e12 if hw else None,
        "attention": resolve(program.model.cfg.attention),
        "params": program.model.n_params,
        "model_flops_per_step": cost.model_flops_per_step(program.model, batch, seq),
        "predicted_step_s": predicted.step_time_s,
        "predicted_mfu": predicted.mfu if hw else None,
    }


def on_host(program):
    """The same program for this machine's CPU. The compiler report reads XLA:CPU's program,
    as `spmd explain` does everywhere: in XLA:GPU's, the matmuls are cuBLAS and cuDNN custom
    calls that the report's FLOP count does not see."""
    import jax

    from spmd.layout import Layout

    host = Layout.make("data=1", program.layout.rules, jax.devices("cpu")[:1])
    return dataclasses.replace(program, layout=host)


def time_steps(program, compiled, steps: int) -> dict:
    """Median of `steps` steps after WARMUP, each ended by blocking on its loss."""
    import jax

    from spmd.compiler import cost

    train_state = program.init_state(jax.random.key(0))
    batch = random_batch(program)
    times = []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        train_state, metrics = compiled(train_state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = cost.model_flops_per_step(program.model, *program.shapes["inputs"])
    hw = cost.hardware_of_devices()
    return {
        "step_s": step_s,
        "step_times_s": times,
        "tflops": flops / step_s / 1e12,
        "mfu": cost.mfu(flops, step_s, hw, 1) if hw else None,
        "loss": float(metrics["loss"]),
        "peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
    }


def random_batch(program) -> dict:
    import jax
    import numpy as np

    batch, seq = program.shapes["inputs"]
    tokens = np.random.default_rng(0).integers(
        0, program.model.cfg.vocab_size, (batch, seq + 1), dtype=np.int32
    )
    arrays = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return {k: jax.device_put(arrays[k], s) for k, s in program.batch_shardings.items()}


def device_info() -> dict:
    import jax

    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "memory_limit_bytes": (device.memory_stats() or {}).get("bytes_limit"),
    }


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


UNITS = {"": 1, "B": 1, "bytes": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def bytes_in_message(text: str) -> float | None:
    """The size in XLA's "...allocate 136.00GiB" / "allocating 146028888064 bytes"."""
    m = re.search(r"allocat\w*\s+([\d.]+)\s*(bytes|[KMGT]i?B|B)?", text)
    if not m:
        return None
    unit = (m.group(2) or "")[:1] if m.group(2) != "bytes" else "bytes"
    return float(m.group(1)) * UNITS[unit]


def out_of_memory(row: dict, needs: float | None, message: str) -> dict:
    return {**row, "status": "oom", "needs_bytes": needs, "error": message.strip()[:500]}


# --- the parent: one fresh process per case, results written as they come -----------------


def run_case(case: Case, args) -> dict:
    if args.same_process:
        # The device's peak counter spans the whole process: not this case's alone.
        return {**measure(case, args.steps, limit_bytes(args)), "peak_bytes": None}
    argv = [sys.executable, "-m", "experiments.gpu", "--worker", case.name,
            "--steps", str(args.steps)]  # fmt: skip
    if args.memory_limit_gb:
        argv += ["--memory-limit-gb", str(args.memory_limit_gb)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.case_timeout,
                              cwd=REPO, env=worker_env())  # fmt: skip
    except subprocess.TimeoutExpired:
        return failed(case, f"timed out after {args.case_timeout} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    # A process killed by the allocator prints no row, only its complaint.
    if is_oom(done.stderr):
        return out_of_memory(case.describe(), bytes_in_message(done.stderr), done.stderr[-500:])
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return failed(case, last)


def worker_env() -> dict:
    """A plain checkout need not be installed: the worker finds spmd in the repository."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def failed(case: Case, message: str) -> dict:
    return {**case.describe(), "status": "failed", "error": message}


def limit_bytes(args) -> float | None:
    return args.memory_limit_gb * 1e9 if args.memory_limit_gb else None


def run(cases, args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / "gpu.jsonl", out / "gpu.md"
    jsonl.write_text("")
    rows = []
    for case in cases:
        row = run_case(case, args)
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        md.write_text(markdown(rows, args.steps))
        print(table_row(row), flush=True)
    print(f"wrote {jsonl} and {md}")
    return rows


# --- the table -----------------------------------------------------------------------------

COLUMNS = ("case", "batch", "remat", "step", "TFLOP/s", "MFU", "peak memory",
           "predicted step", "predicted MFU")  # fmt: skip


def markdown(rows: list[dict], steps: int) -> str:
    lines = [header(rows, steps), "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += [table_row(r) for r in rows]
    return "\n".join(lines) + "\n"


def header(rows: list[dict], steps: int) -> str:
    info = next((r for r in rows if "device_kind" in r), {})
    kind, platform = info.get("device_kind", "unknown device"), info.get("platform", "?")
    peak = next((r["peak_tflops"] for r in rows if r.get("peak_tflops")), None)
    mfu = f"MFU = model FLOPs / {peak:.4g} TFLOP/s" if peak else "MFU n/a (no profile)"
    text = (f"spmd's train step on one {kind} ({platform}), jax {info.get('jax', '?')}, "
            f"data=1, median of {steps} steps after {WARMUP} warm-up; {mfu}.")  # fmt: skip
    if platform == "cpu":
        text += " A CPU run: these are not GPU figures."
    return text


def table_row(r: dict) -> str:
    head = [r["case"], str(r["batch"]), r["remat"]]
    if r.get("status") != "ok":
        what = oom_text(r) if r.get("status") == "oom" else f"failed: {r.get('error', '?')}"
        rest = [what, "-", "-", "-", ms(r.get("predicted_step_s")), pct(r.get("predicted_mfu"))]
        return "| " + " | ".join(head + rest) + " |"
    peak = gb(r["peak_bytes"]) if r.get("peak_bytes") else f"{gb(r['compiled_bytes'])} (compiled)"
    rest = [ms(r["step_s"]), f"{r['tflops']:.3g}", pct(r["mfu"]), peak,
            ms(r["predicted_step_s"]), pct(r["predicted_mfu"])]  # fmt: skip
    return "| " + " | ".join(head + rest) + " |"


def oom_text(r: dict) -> str:
    needs = r.get("needs_bytes")
    return f"out of memory: needs {gb(needs)}" if needs else "out of memory"


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.4g} ms"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny CPU cases (the tests)")
    p.add_argument("--cases", help="comma-separated case names (default: all of the set)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per case (median)")
    p.add_argument("--out", default=str(RESULTS), help="folder for gpu.jsonl and gpu.md")
    p.add_argument("--memory-limit-gb", type=float, help="treat as the device's memory")
    p.add_argument("--case-timeout", type=float, default=600, help="seconds per case")
    p.add_argument("--same-process", action="store_true",
                   help="run cases here (peak memory is then not recorded per case)")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select(args) -> list[Case]:
    pool = TINY_CASES if args.tiny else GPU_CASES
    if not args.cases:
        return list(pool)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown:
        raise SystemExit(f"unknown case {unknown[0]!r}; choose from {', '.join(ALL_CASES)}")
    return [ALL_CASES[n] for n in names]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        row = measure(ALL_CASES[args.worker], args.steps, limit_bytes(args))
        print(RESULT_TAG + json.dumps(row), flush=True)
        return [row]
    return run(select(args), args)


if __name__ == "__main__":
    main()
