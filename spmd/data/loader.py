"""Packed fixed-length sequences in a seeded order, read with grain, with a tiny state.

The token stream is cut into windows of `seq + 1` tokens. Element `i` of the shuffled
stream is window `shuffle(seed + epoch)[i mod n]` with `epoch = i // n` (grain's Feistel
index shuffle: O(1) memory, a fresh permutation every epoch). Global batch `s` is elements
`s*B .. s*B + B - 1`. So the batches depend only on the seed, the batch size and the
sequence length: never on the mesh, the device count or the process count.

A process reads only its own rows of each global batch (`rows`), and the iterator state is
one integer, the next global batch, identical on every process.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from spmd.errors import SpmdError


class TokenWindows:
    """A grain random-access source: window j is tokens[j*seq : j*seq + seq + 1]."""

    def __init__(self, tokens: np.ndarray, seq: int):
        self.tokens, self.seq = tokens, seq

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.tokens[j * self.seq : j * self.seq + self.seq + 1]


class BatchRows(grain.MapDataset):
    """Element s is rows `rows` of global batch s (an endless stream of batches)."""

    def __init__(self, parent: grain.MapDataset, batch: int, rows: range):
        super().__init__(parent)
        self._batch, self._rows = batch, rows

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"BatchRows(batch={self._batch}, rows={self._rows})"

    def __getitem__(self, s):
        if isinstance(s, slice):
            return self.slice(s)
        windows = np.stack([self._parent[s * self._batch + r] for r in self._rows])
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class PackedLoader:
    """Batches of packed windows; `rows` selects this process's rows of each global batch.

    `shuffle=False` keeps the windows in order (the validation split).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch: int,
        seq: int,
        seed: int,
        rows: range | None = None,
        shuffle: bool = True,
        prefetch: int = 2,
    ):
        if batch < 1 or seq < 1:
            raise SpmdError(f"batch={batch} and seq={seq} must be positive")
        source = TokenWindows(np.asarray(tokens, np.int32), seq)
        if len(source) < batch:
            raise SpmdError(
                f"the corpus has {len(tokens)} tokens, too few for one batch of "
                f"{batch}x{seq}; use a smaller --batch or --seq, or more data"
            )
        self.batch, self.seq, self.n_windows = batch, seq, len(source)
        self.rows = range(batch) if rows is None else rows
        if not (0 <= self.rows.start <= self.rows.stop <= batch) or self.rows.step != 1:
            raise SpmdError(f"rows {self.rows} are not a contiguous part of a batch of {batch}")
        windows = grain.MapDataset.source(source)
        if shuffle:
            windows = windows.shuffle(seed=seed % 2**32)
        self.dataset = BatchRows(windows, batch, self.rows)
        # One background thread keeps `prefetch` batches ready while the devices compute.
        options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
        self._iter = iter(self.dataset.to_iter_dataset(options))

    @property
    def batches_per_epoch(self) -> float:
        return self.n_windows / self.batch

    def batch_at(self, s: int) -> dict[str, np.ndarray]:
        """Global batch s (this process's rows of it), without moving the iterator."""
        return self.dataset[s]

    def next(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, int]:
        return {"next_batch": int(self._iter.get_state()["next_index"])}

    def set_state(self, state: dict[str, int]) -> None:
        self._iter.set_state({"next_index": int(state["next_batch"])})
