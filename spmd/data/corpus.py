"""Text sources: the Python standard library's own source (the default), or user files.

The stdlib is real text present on every machine, so the default run downloads nothing.
A corpus is a list of `(name, text)` documents in a stable order.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
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
    docs = [(str(p.relative_to(root)), _read(p, strict=False)) for p in files]
    docs = [d for d in docs if d[1]]
    if not docs:
        raise SpmdError(f"found no Python source in the standard library at {root}")
    return docs


def load_documents(path: str | None) -> list[Document]:
    """`None` -> the stdlib; else a text file, a folder of text files, a glob, or `.jsonl`."""
    if path is None:
        return stdlib_documents()
    root, files = _resolve(path)
    docs: list[Document] = []
    for f in files:
        name = f.relative_to(root).as_posix()
        docs.extend(_jsonl(f, name) if f.suffix == ".jsonl" else [(name, _read(f))])
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


def _resolve(path: str) -> tuple[Path, list[Path]]:
    """(root, the files `path` names). Documents are named relative to the root (the file's
    folder, the folder, or a glob's fixed prefix): names decide the validation split, so
    they must not depend on how the path was spelled (`data/x` or `/home/me/data/x`) or
    on where the corpus lives."""
    p = Path(os.path.abspath(path))
    if p.is_file():
        return p.parent, [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise SpmdError(
                f"--data {path} is a folder with no text files ({', '.join(TEXT_SUFFIXES)})"
            )
        return p, files
    if glob.has_magic(path):
        found = glob.glob(str(p), recursive=True)
        files = sorted(Path(f) for f in found if os.path.isfile(f))
        if not files:
            raise SpmdError(f"--data {path} matches no files")
        fixed = itertools.takewhile(lambda part: not glob.has_magic(part), p.parts)
        return Path(*fixed), files
    raise SpmdError(f"--data {path} does not exist")


def _read(path: Path, strict: bool = True) -> str:
    """A user's file must be UTF-8: a binary or mis-encoded one would otherwise train the
    model on replacement characters without a word. The stdlib is read leniently."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpmdError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as e:
        raise SpmdError(
            f"--data: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); convert it to UTF-8 or leave it out"
        ) from None


def _jsonl(path: Path, name: str) -> list[Document]:
    docs = []
    for i, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SpmdError(f"{path}:{i} is not a JSON object with a 'text' field") from None
        docs.append((f"{name}:{i}", str(text)))
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
