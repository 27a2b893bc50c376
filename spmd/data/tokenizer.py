"""Byte-level tokenizer: ids 0..255 are bytes, 256 is end-of-document.

The vocabulary is padded to a multiple of 128 so the embedding and head shard evenly.
"""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    eos_id = 256
    vocab_size = 384  # 257 ids, padded to a multiple of 128

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def tokenize_documents(docs, tokenizer) -> np.ndarray:
    """One stream: each document's ids followed by EOS."""
    parts = []
    eos = np.array([tokenizer.eos_id], np.int32)
    for _, text in docs:
        parts.extend([tokenizer.encode(text), eos])
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)
