"""Text sources: the Python standard library's own source (the default), or user files.

The stdlib is real text present on every machine, so the default run downloads nothing.
A corpus is a list of `(name, text)` documents in a stable order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import zlib
from pathlib import Path

from spmd.errors import SpmdError

Document = tuple[str, str]
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")


def stdlib_documents() -> list[Document]:
    """Every `.py` file of the running interpreter's standard library, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    docs = [(str(p.relative_to(root)), _read(p)) for p in files]
    docs = [d for d in docs if d[1]]
    if not docs:
        raise SpmdError(f"found no Python source in the standard library at {root}")
    return docs


def load_documents(path: str | None) -> list[Document]:
    """`None` -> the stdlib; else a text file, a folder of text files, a glob, or `.jsonl`."""
    if path is None:
        return stdlib_documents()
    files = _resolve(path)
    docs: list[Document] = []
    for f in files:
        docs.extend(_jsonl(f) if f.suffix == ".jsonl" else [(str(f), _read(f))])
    docs = [d for d in docs if d[1].strip()]
    if not docs:
        raise SpmdError(f"--data {path} holds no text")
    return docs


def fingerprint(docs: list[Document]) -> str:
    """sha256 over every document's name and text, in order: equal exactly when the batch
    sequence is (names decide the validation split). About 50 ms for the stdlib's 30 MB."""
    digest = hashlib.sha256()
    for doc in docs:
        for part in doc:
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))  # no two splits hash alike
            digest.update(data)
    return digest.hexdigest()


def _resolve(path: str) -> list[Path]:
    """The files `path` names, as absolute paths: document names must not depend on how
    the path was spelled (`data/x` or `/home/me/data/x`), since they decide the split."""
    p = Path(os.path.abspath(path))
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise SpmdError(
                f"--data {path} is a folder with no text files ({', '.join(TEXT_SUFFIXES)})"
            )
        return files
    if glob.has_magic(path):
        found = glob.glob(str(p), recursive=True)
        files = sorted(Path(f) for f in found if os.path.isfile(f))
        if not files:
            raise SpmdError(f"--data {path} matches no files")
        return files
    raise SpmdError(f"--data {path} does not exist")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SpmdError(f"cannot read {path}: {e.strerror}") from None


def _jsonl(path: Path) -> list[Document]:
    docs = []
    for i, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SpmdError(f"{path}:{i} is not a JSON object with a 'text' field") from None
        docs.append((f"{path}:{i}", str(text)))
    return docs


def split_documents(docs: list[Document], val_fraction: float = 0.02):
    """A held-out split by document, stable under reordering: it hashes each name."""
    bucket = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    train, val = [], []
    for doc in docs:
        is_val = bucket and zlib.crc32(doc[0].encode()) % bucket == 0
        (val if is_val else train).append(doc)
    if not train:
        train, val = val, []
    return train, val
