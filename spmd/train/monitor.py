"""What a run reports: the progress bar, JSON Lines metrics, TensorBoard, the loss plot, MFU.

Only the main process writes anything (`Monitor(enabled=...)`); every process still fetches
the metrics, so they all see a NaN at the same step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from spmd import params as P
from spmd.errors import SpmdError

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v4": 275e12,
}


def flops_per_token(model, seq: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies, plus causal attention's
    score and value matmuls (12 * layers * heads * head_dim * seq, forward and backward)."""
    specs = model.specs()
    n = P.count(specs) - (P.count(specs["embed"]) if "embed" in specs else 0)
    cfg = model.cfg
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq if hasattr(cfg, "n_heads") else 0
    return 6.0 * n + attn


def peak_flops() -> float:
    """Peak FLOP/s of all devices in the job. On CPU, a timed matmul stands in for the data
    sheet: one SPMD matmul over every local device, since simulated devices share the cores."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        kind = device.device_kind.lower()
        per_chip = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
        return per_chip * jax.device_count() if per_chip else float("nan")
    return _host_matmul_flops() * jax.process_count()


def _host_matmul_flops(n: int = 512, tries: int = 5) -> float:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("d",))
    x = jax.device_put(
        np.ones((n * len(devices), n), np.float32), NamedSharding(mesh, PartitionSpec("d"))
    )
    w = jax.device_put(np.ones((n, n), np.float32), NamedSharding(mesh, PartitionSpec()))
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(x, w).block_until_ready()
    best = float("inf")
    for _ in range(tries):  # the best of a few: other work on the host only slows it
        t0 = time.perf_counter()
        matmul(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * len(devices) / best


def check_finite(row: dict) -> None:
    for key in ("loss", "grad_norm", "param_norm"):
        if key in row and not np.isfinite(row[key]):
            raise SpmdError(
                f"{key} became {row[key]} at step {row['step']} (loss={row['loss']:.4g}, "
                f"grad_norm={row['grad_norm']:.4g}); stopped before saving that step: "
                "lower --lr or raise --warmup"
            )


class Monitor:
    """Turns fetched metrics into rows, and rows into the bar, the files and the plot."""

    def __init__(
        self,
        cfg,
        start_step: int,
        tokens_per_step: int,
        flops_per_step: float,
        peak: float,
        enabled: bool,
    ):
        self.cfg, self.enabled = cfg, enabled
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
        self.rows: list[dict] = []  # this run's rows
        self.earlier = _earlier_rows(cfg.metrics_file, start_step) if enabled else []
        self._sink = self._tb = None
        if enabled and cfg.metrics_file:
            self._sink = _rewrite(cfg.metrics_file, self.earlier)
        if enabled and cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(cfg.tensorboard)
        self._bar = tqdm(
            total=cfg.steps,
            initial=start_step,
            disable=not (enabled and cfg.progress),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._last = time.perf_counter()

    def fetch(self, step: int, metrics) -> dict:
        """Wait for a step's metrics; check them. Every process calls this."""
        row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        now = time.perf_counter()
        row["step_time_s"], self._last = now - self._last, now
        row["tokens_per_s"] = self.tokens_per_step / row["step_time_s"]
        row["mfu"] = self.flops_per_step / row["step_time_s"] / self.peak
        check_finite(row)
        return row

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        if self._sink:
            self._sink.write(json.dumps(row) + "\n")
            self._sink.flush()
        if self._tb:
            for key, value in row.items():
                if key != "step":
                    group = "eval" if key.startswith("eval") else "train"
                    self._tb.add_scalar(f"{group}/{key}", value, row["step"])
        post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
        if np.isfinite(row["mfu"]):
            post["mfu"] = f"{100 * row['mfu']:.1f}%"
        if "eval_loss" in row:
            post["eval"] = f"{row['eval_loss']:.3f}"
        self._bar.set_postfix(post)
        self._bar.update(row["step"] - self._bar.n)

    def close(self) -> None:
        self._bar.close()
        if self._sink:
            self._sink.close()
        if self._tb:
            self._tb.close()

    def plot(self, path: str) -> None:
        if self.enabled:
            plot_losses(self.earlier + self.rows, path)


def _earlier_rows(path: str | None, start_step: int) -> list[dict]:
    """Rows a resumed run keeps: those up to the step it resumes from."""
    if not path or not start_step or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and row.get("step", start_step + 1) <= start_step:
            rows.append(row)
    return rows


def _rewrite(path: str, rows: list[dict]):
    """The file holding exactly `rows`, open for appending. The rows go to a temporary file
    that replaces the old one only once it is on disk, so a kill or a failure at any moment
    leaves the old file or the new one whole, never a truncated one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the metrics from others
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(target.parent)
    return open(target, "a")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX keeps it in the folder's entry, not the file)."""
    with contextlib.suppress(OSError):  # some filesystems refuse to open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def plot_losses(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def report(cfg, s: dict, argv: list[str] | None) -> None:
    if s["steps"]:
        print(
            f"done: {s['steps']} steps | loss {s['first_loss']:.4f} -> {s['final_loss']:.4f} | "
            f"{s['tokens_per_s']:,.0f} tokens/s (median, steady state)"
            + (f" | eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else "")
            + (f" | metrics in {cfg.metrics_file}" if cfg.metrics_file else ""),
            flush=True,
        )
    else:
        print(f"nothing to do: already at step {s['last_step']} of --steps {cfg.steps}")
    if cfg.ckpt_dir:
        what = f"stopped by {s['stopped_by']} at" if s["stopped_by"] else "checkpoint at"
        print(
            f"{what} step {s['last_step']} in {cfg.ckpt_dir}; resume with: {_resume_command(argv)}",
            flush=True,
        )
    elif s["stopped_by"]:
        print(
            f"stopped by {s['stopped_by']} at step {s['last_step']}; no --ckpt-dir, so "
            "nothing was saved",
            flush=True,
        )
    if cfg.plot:
        print(f"loss curve in {cfg.plot}", flush=True)


def _resume_command(argv: list[str] | None) -> str:
    if argv is None:
        return "the same command with --resume"
    args = list(argv) if "--resume" in argv else [*argv, "--resume"]
    return "spmd " + shlex.join(args)
