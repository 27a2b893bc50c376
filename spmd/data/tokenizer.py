"""Tokenizers: byte-level (the default) or a byte-level BPE trained with `tokenizers`.

Both expose `encode`, `encode_batch`, `decode`, `eos_id` and a `vocab_size` padded to a
multiple of 128, so the embedding and the head shard evenly over any tensor axis.
A BPE tokenizer is a JSON file (the `tokenizers` format): loading it runs no code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from spmd.errors import SpmdError

PAD_MULTIPLE = 128
EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens looked for in order: ours, then Llama 1/2's and Llama 3's (a
# tokenizer.json carried across from a Hugging Face checkpoint).
EOS_TOKENS = (EOS_TOKEN, "</s>", "<|end_of_text|>")


def padded(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


class ByteTokenizer:
    """Ids 0..255 are bytes, 256 is end-of-document."""

    name = "bytes"
    eos_id = 256
    vocab_size = padded(257)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` library, read from its JSON file."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = str(Path(path).resolve())
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the library raises bare Exceptions for bad files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SpmdError(f"--tokenizer {path} is not a tokenizers JSON file: {reason}") from None
        ids = [self._tok.token_to_id(token) for token in EOS_TOKENS]
        eos = next((i for i in ids if i is not None), None)
        if eos is None:
            raise SpmdError(f"--tokenizer {path} has no {' or '.join(EOS_TOKENS)} token")
        self.name, self.eos_id = f"bpe:{Path(path).name}", int(eos)
        self.vocab_size = padded(self._tok.get_vocab_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self._tok.get_vocab_size()])


def load_tokenizer(path: str | None):
    """`None` -> bytes; else a BPE JSON file written by `spmd tokenizer train`."""
    if path is None:
        return ByteTokenizer()
    if not Path(path).is_file():
        problem = "is a folder, not a JSON file" if Path(path).is_dir() else "does not exist"
        raise SpmdError(f"--tokenizer {path} {problem}")
    return BPETokenizer(path)


def checkpoint_tokenizer(recorded: str | None, ckpt_dir: str) -> str | None:
    """The tokenizer a checkpoint's config names, or, when that path is gone (the folder was
    copied or moved), the `tokenizer.json` inside the checkpoint folder (`spmd convert`
    puts one there)."""
    beside = Path(ckpt_dir) / "tokenizer.json"
    if recorded and not Path(recorded).is_file() and beside.is_file():
        return str(beside.absolute())
    return recorded


def train_bpe(texts: Iterable[str], vocab: int, out: str) -> int:
    """Train a byte-level BPE on `texts`, write it to `out`; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab < len(alphabet) + 1:
        raise SpmdError(f"--vocab={vocab} must be at least {len(alphabet) + 1} (bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    json.loads(Path(out).read_text())  # it must read back as plain JSON
    return tok.get_vocab_size()


def tokenize_documents(docs, tokenizer, chunk: int = 256) -> np.ndarray:
    """One stream: each document's ids followed by EOS."""
    parts = []
    eos = np.array([tokenizer.eos_id], np.int32)
    for i in range(0, len(docs), chunk):
        for ids in tokenizer.encode_batch([text for _, text in docs[i : i + chunk]]):
            parts.extend([ids, eos])
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)
