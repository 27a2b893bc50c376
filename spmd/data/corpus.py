"""Text sources: the Python standard library's own source (the default), or user files.

The stdlib is real text present on every machine, so the default run downloads nothing.
A corpus is a sequence of `(name, text)` documents in a stable order; `iter_documents` yields
it lazily (a Parquet file streams a record batch at a time), `load_documents` as a list.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from spmd.data import parquet
from spmd.errors import SpmdError

Document = tuple[str, str]
VAL_FRACTION = 0.02
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl", parquet.SUFFIX)


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
    """`None` -> the stdlib; else a text file, a folder of text files, a glob, `.jsonl` or
    `.parquet` (all of it in memory: `iter_documents` streams)."""
    if path is None:
        return stdlib_documents()
    return list(iter_documents(path))


def iter_documents(path: str | None) -> Iterator[Document]:
    """The documents of `load_documents(path)`, in the same order, one file at a time (a
    Parquet file one record batch at a time). Empty documents are left out."""
    if path is None:
        yield from stdlib_documents()
        return
    root, files = _resolve(path)
    found = False
    for f in files:
        name = f.relative_to(root).as_posix()
        for doc in _file_documents(f, name):
            if doc[1].strip():
                found = True
                yield doc
    if not found:
        raise SpmdError(f"--data {path} holds no text")


def _file_documents(f: Path, name: str) -> Iterable[Document]:
    if parquet.is_parquet(f):
        return parquet.documents(f, name)
    return _jsonl(f, name) if f.suffix == ".jsonl" else [(name, _read(f))]


def fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over every document's name and text, in order: equal exactly when the batch
    sequence is (names decide the validation split). About 50 ms for the stdlib's 30 MB."""
    digest = hashlib.sha256()
    for doc in docs:
        add_to_fingerprint(digest, doc)
    return digest.hexdigest()


def add_to_fingerprint(digest, doc: Document) -> None:
    """One more document into a running `fingerprint` (a hashlib sha256)."""
    for part in doc:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))  # no two splits hash alike
        digest.update(data)


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


def split_documents(docs: list[Document], val_fraction: float = VAL_FRACTION):
    """A held-out split by document, stable under reordering: it hashes each name."""
    train, val = [], []
    for doc in docs:
        (val if is_validation(doc[0], val_fraction) else train).append(doc)
    if not train:
        train, val = val, []
    return train, val


def is_validation(name: str, val_fraction: float = VAL_FRACTION) -> bool:
    """Whether the document of this name is held out (about `val_fraction` of them are)."""
    bucket = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    return bool(bucket) and zlib.crc32(name.encode()) % bucket == 0
