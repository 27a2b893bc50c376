"""From documents to the train and validation token streams, in one pass that keeps neither
the documents nor the tokens in memory.

Each document is hashed into the data fingerprint, sent to its split by its name
(`corpus.is_validation`), tokenized in chunks, and its ids and an EOS appended to that
split's token file. The files are anonymous temporary files (under `$TMPDIR`, 4 bytes a
token, gone when the streams are) that the loader reads through `np.memmap`, so the pages
the operating system holds are a cache, not a copy: a corpus larger than memory trains.

The result equals the in-memory path token for token: `tokenize_documents` of each half of
`split_documents(load_documents(path))`, and `fingerprint` of the same documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Iterable

import numpy as np

from spmd.data import corpus
from spmd.data.corpus import Document

CHUNK_DOCS = 256  # documents per tokenizer call (a BPE tokenizer batches them over threads)


class TokenFile:
    """An append-only int32 array on disk, read back as a memory map."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="spmd-tokens-")
        self.length = 0

    def append(self, ids: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(ids, np.int32).tobytes())
        self.length += len(ids)

    def array(self) -> np.ndarray:
        self._file.flush()
        if not self.length:
            return np.zeros((0,), np.int32)
        return np.memmap(self._file, np.int32, mode="r", shape=(self.length,))


@dataclasses.dataclass(frozen=True)
class TokenStreams:
    train: np.ndarray
    val: np.ndarray
    sha256: str  # corpus.fingerprint of every document, in order
    documents: int


def token_streams(docs: Iterable[Document], tokenizer, val_fraction=corpus.VAL_FRACTION):
    """The train and validation token streams of `docs`, read once."""
    digest = hashlib.sha256()
    files = {False: TokenFile(), True: TokenFile()}  # keyed by "held out"
    pending: dict[bool, list[str]] = {False: [], True: []}
    eos = np.array([tokenizer.eos_id], np.int32)
    count = 0

    def flush(held_out: bool) -> None:
        for ids in tokenizer.encode_batch(pending[held_out]):
            files[held_out].append(np.concatenate([ids.astype(np.int32), eos]))
        pending[held_out].clear()

    for name, text in docs:
        corpus.add_to_fingerprint(digest, (name, text))
        held_out = corpus.is_validation(name, val_fraction)
        pending[held_out].append(text)
        count += 1
        if len(pending[held_out]) == CHUNK_DOCS:
            flush(held_out)
    flush(False)
    flush(True)
    train, val = files[False].array(), files[True].array()
    if not len(train):  # as split_documents: with no training documents, train on the rest
        train, val = val, np.zeros((0,), np.int32)
    return TokenStreams(train, val, digest.hexdigest(), count)
