"""Packed fixed-length sequences in a seeded order, with a small checkpointable state.

Row i of an epoch is the window tokens[j*seq : j*seq + seq + 1] for j = perm[i], where perm
is drawn from (seed, epoch) alone. So the batches depend only on the seed, the batch size
and the sequence length: never on the mesh, the device count or the process count.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spmd.errors import SpmdError


@dataclasses.dataclass
class LoaderState:
    epoch: int = 0
    index: int = 0  # batches already taken in this epoch


class PackedLoader:
    def __init__(self, tokens: np.ndarray, batch: int, seq: int, seed: int):
        if batch < 1 or seq < 1:
            raise SpmdError(f"batch={batch} and seq={seq} must be positive")
        self.tokens, self.batch, self.seq, self.seed = tokens, batch, seq, seed
        self.n_windows = (len(tokens) - 1) // seq
        self.batches_per_epoch = self.n_windows // batch
        if self.batches_per_epoch < 1:
            raise SpmdError(
                f"the corpus has {len(tokens)} tokens, too few for one batch of "
                f"{batch}x{seq}; use a smaller --batch or --seq, or more data"
            )
        self.state = LoaderState()
        self._cached: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._cached = (epoch, perm)
        return self._cached[1]

    def rows(self, epoch: int, index: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Batch `index` of `epoch` (only `rows` of it: a process reads just its own)."""
        starts = self._perm(epoch)[index * self.batch : (index + 1) * self.batch][rows] * self.seq
        windows = self.tokens[starts[:, None] + np.arange(self.seq + 1)]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def next(self, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        if self.state.index >= self.batches_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        out = self.rows(self.state.epoch, self.state.index, rows)
        self.state = LoaderState(self.state.epoch, self.state.index + 1)
        return out

    def get_state(self) -> dict[str, int]:
        return dataclasses.asdict(self.state)

    def set_state(self, state: dict[str, int]) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["index"]))
