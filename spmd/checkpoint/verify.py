"""Verifying: every array's bytes read back from the files, in bounded memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spmd.checkpoint import faults
from spmd.checkpoint.steps import ARRAY_ITEMS, step_problem
from spmd.errors import SpmdError


class CouldNotVerify(SpmdError):
    """Reading a step failed for a reason that says nothing against it (see faults.py)."""


VERIFY_BLOCK_BYTES = 64 << 20  # the most that verifying holds in memory at once


def verify_step(ckpt_dir: str, step: int) -> str | None:
    """Like `step_problem`, but also reads every array's bytes (catches truncation).

    It reads straight from the files with tensorstore, one array and at most
    VERIFY_BLOCK_BYTES at a time, on no device. Raises CouldNotVerify if reading fails for
    a reason that is no verdict on the step (out of memory, no permission, EIO).
    """
    try:
        problem = step_problem(ckpt_dir, step)
        if problem:
            return problem
        for item in ARRAY_ITEMS:
            read_every_array(Path(ckpt_dir).absolute() / str(step) / item)
    except Exception as e:  # tensorstore raises many kinds; faults sorts them
        reason, line = faults.not_corruption(e), faults.first_line(e)
        if reason:
            raise CouldNotVerify(f"{reason}: {line}") from None
        return f"reading it failed: {line}"
    return None


def read_every_array(item_dir: Path) -> None:
    import tensorstore as ts

    json.loads((item_dir / "_METADATA").read_text())
    kvstore = {"driver": "ocdbt", "base": f"file://{item_dir}/"}
    for key in sorted(ts.KvStore.open(kvstore).result().list().result()):
        name, _, leaf = key.decode().rpartition("/")
        driver = {".zarray": "zarr", "zarr.json": "zarr3"}.get(leaf)
        if name and driver:
            spec = {
                "driver": driver,
                "kvstore": {**kvstore, "path": f"{name}/"},
                "fill_missing_data_reads": False,  # a missing chunk is damage, not zeros
            }
            _read_in_blocks(ts.open(spec, open=True, read=True).result())


def _read_in_blocks(array) -> None:
    if array.ndim == 0 or array.shape[0] == 0:
        array.read().result()
        return
    row_bytes = array.dtype.numpy_dtype.itemsize * int(np.prod(array.shape[1:]))
    rows = max(1, VERIFY_BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, array.shape[0], rows):
        array[start : min(start + rows, array.shape[0])].read().result()  # no clamping
