"""Checks on the paths a run will write, made before anything slow runs.

A bad output path found late costs the whole run: the metrics file is opened after compiling,
and the loss plot is drawn only after the last step, where a failure also loses the line
that says how to resume. So each path is checked first, and its message names the flag.
"""

from __future__ import annotations

import os
from pathlib import Path

from spmd.errors import SpmdError


def check_output_paths(cfg) -> None:
    """Every output of a `TrainConfig`: files must be files, folders folders, all writable."""
    if cfg.metrics_file:
        check_output_file("--metrics-file", cfg.metrics_file, "metrics.jsonl")
    if cfg.plot:
        check_output_file("--plot", cfg.plot, "loss.png")
        check_plot_format(cfg.plot)
    if cfg.tensorboard:
        check_output_dir("--tensorboard", cfg.tensorboard)
    if cfg.ckpt_dir:
        check_output_dir("--ckpt-dir", cfg.ckpt_dir)


def check_output_file(flag: str, path: str, example: str, make_parents: bool = True) -> None:
    """`path` can be written as a file; its missing parent folders are made unless
    `make_parents` is False, in which case they must exist."""
    p = Path(path)
    if path.endswith(os.sep) or p.is_dir():
        raise SpmdError(f"{flag} {path} is a folder; give a file, e.g. {p / example}")
    if p.exists():  # rewriting a file (even /dev/null) needs only the file to be writable
        if not os.access(p, os.W_OK):
            raise SpmdError(f"{flag} {path} exists and is not writable")
        return
    if not make_parents and not p.parent.is_dir():
        raise SpmdError(f"{flag} {path}: the folder {p.parent} does not exist")
    _check_writable_parent(flag, path, p.parent)


def check_output_dir(flag: str, path: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SpmdError(f"{flag} {path} is a file, not a folder; give a folder")
    _check_writable_parent(flag, path, p)


def check_plot_format(path: str) -> None:
    """matplotlib picks the format from the extension; ask it which it can write."""
    # The base canvas lists every format the installed backends can save to, without
    # choosing a backend, so no display is touched.
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    ext = Path(path).suffix.lstrip(".").lower()
    if ext not in formats:
        problem = f"matplotlib cannot write .{ext} files" if ext else "it has no extension"
        raise SpmdError(
            f"--plot {path}: {problem}; use one of {', '.join('.' + f for f in sorted(formats))}"
        )


def _check_writable_parent(flag: str, path: str, p: Path) -> None:
    """The nearest existing folder at or above `p` must be a writable folder."""
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SpmdError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpmdError(f"{flag} {path}: cannot write in {existing} (permission denied)")
