"""What a run reports: the progress bar, JSON Lines metrics, TensorBoard, the loss plot, MFU.

Only the main process writes anything (`Monitor(enabled=...)`); every process still fetches
the metrics, so they all see a NaN at the same step. MFU is `spmd.compiler.cost.mfu` with
the model FLOPs of `cost.model_flops_per_step`, against the same hardware profile
`spmd explain` uses, so the measured and the predicted figure can be compared directly.
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

from spmd.compiler import cost
from spmd.errors import SpmdError


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
        hardware: cost.Hardware | None,
        enabled: bool,
        header: dict | None = None,
    ):
        self.cfg, self.enabled = cfg, enabled
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.hardware, self.devices = hardware, jax.device_count()
        # Merged into the first row this run writes: the layout it ran on, so a metrics file
        # says which mesh and rules produced it, resumed segments included.
        self._header = dict(header or {})
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
        # A local-SGD step's metrics are per worker (a leading axis): their mean is the step's.
        per_worker = getattr(self.cfg, "local_steps", None) is not None
        values = jax.device_get(metrics)
        row = {"step": step, **{k: _number(v, per_worker) for k, v in values.items()}}
        now = time.perf_counter()
        row["step_time_s"], self._last = now - self._last, now
        row["tokens_per_s"] = self.tokens_per_step / row["step_time_s"]
        row["mfu"] = (
            cost.mfu(self.flops_per_step, row["step_time_s"], self.hardware, self.devices)
            if self.hardware
            else float("nan")
        )
        check_finite(row)
        return row

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        if self._sink:
            self._sink.write(json.dumps({**row, **self._header}) + "\n")
            self._sink.flush()
            self._header = {}
        if self._tb:
            for key, value in row.items():
                if key != "step":
                    group = "eval" if key.startswith("eval") else "train"
                    for name, x in _scalars(key, value):
                        self._tb.add_scalar(f"{group}/{name}", x, row["step"])
        post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
        if np.isfinite(row["mfu"]):
            post["mfu"] = f"{100 * row['mfu']:.1f}%"
        if "eval_loss" in row:
            post["eval"] = f"{row['eval_loss']:.3f}"
        post.update(moe_postfix(row))
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


def _number(value, per_worker: bool = False):
    """A metric as JSON: a float, or a list of floats (the MoE expert load histogram)."""
    a = np.asarray(value)
    if per_worker:
        a = a.mean(axis=0)
    return float(a) if a.ndim == 0 else [float(x) for x in a.ravel()]


def _scalars(key: str, value):
    if isinstance(value, list):
        return [(f"{key}/{i}", x) for i, x in enumerate(value)]
    return [(key, value)]


def moe_postfix(row: dict) -> dict:
    """Mixture-of-experts health at a glance: the balancing loss, the busiest expert's load
    over the balanced load (1.00 is even), and the dropped fraction in capacity mode."""
    post = {}
    if "moe_aux_loss" in row:
        post["aux"] = f"{row['moe_aux_loss']:.3f}"
    if "moe_load_max" in row:
        post["load"] = f"{row['moe_load_max']:.2f}"
    if "moe_dropped" in row:
        post["drop"] = f"{100 * row['moe_dropped']:.1f}%"
    return post


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
            + "".join(f" | moe {k} {v}" for k, v in moe_postfix(s.get("last_row", {})).items())
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
