"""Reading and writing `*.safetensors` checkpoints, one tensor (or one slice) at a time.

A checkpoint is one `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`weight_map`: tensor name -> file), as transformers writes them. Reading goes through
`safe_open(...).get_slice`, which reads only the bytes of the rows asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spmd.errors import SpmdError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def safetensors():
    """The library, or one line saying how to install it (it is in the `interop` extra)."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise SpmdError(
            "spmd convert needs the safetensors package: pip install 'spmd[interop]' "
            "(or pip install safetensors)"
        ) from None
    return safetensors


class Reader:
    """Tensors by name across a checkpoint's files.

    Each read opens its file and closes it after: safetensors memory-maps the file, and the
    pages a read touched count as the process's memory until the map is closed, so a reader
    that kept its files open would end up holding the whole checkpoint.
    """

    def __init__(self, hf_dir: str):
        self.dir = Path(hf_dir)
        self.files = _weight_map(self.dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, name: str, fn):
        """`fn(lazy)` for the tensor's slice handle: `lazy[rows, cols]` reads that block."""
        path = str(self.dir / self.files[name])
        with safetensors().safe_open(path, framework="numpy") as f:
            return fn(f.get_slice(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.read(name, lambda lazy: lazy.get_shape()))


def _weight_map(hf_dir: Path) -> dict[str, str]:
    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SpmdError(f"{hf_dir / INDEX} is not a safetensors index ({e})") from None
        for file in sorted(set(weight_map.values())):
            if not (hf_dir / file).is_file():
                raise SpmdError(f"{hf_dir / INDEX} lists {file}, which is missing")
        return dict(weight_map)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise SpmdError(f"--hf-dir {hf_dir} has no *.safetensors weights")
    return {name: f.name for f in files for name in _header_names(f)}


def _header_names(path: Path) -> list[str]:
    try:
        with safetensors().safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # the library raises its own SafetensorError for a bad header
        raise SpmdError(f"{path} is not a safetensors file ({e})") from None


class ShardedWriter:
    """Writes tensors in order into shards of at most `max_bytes` (a bigger tensor gets a
    shard of its own), holding one shard in memory; `close` names them as transformers does
    and writes the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        size = sum(t.nbytes for t in self.pending.values())
        if self.pending and size + tensor.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.total += tensor.nbytes

    def _flush(self) -> None:
        save_file = safetensors().numpy.save_file
        save_file(self.pending, str(self._tmp(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending = {}

    def _tmp(self, i: int) -> Path:
        return self.out / f"shard-{i}.tmp"

    def close(self) -> list[str]:
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            self._tmp(0).rename(self.out / SINGLE)
            return [SINGLE]
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, file in enumerate(files):
            self._tmp(i).rename(self.out / file)
        weight_map = {
            name: file for file, names in zip(files, self.shards, strict=True) for name in names
        }
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
