"""Parquet corpora: one document per row of a `text` column, read a record batch at a time.

Only the `text` column is read, through `pyarrow.parquet.ParquetFile.iter_batches`: record
batches of at most `BATCH_ROWS` rows, decoded from one row group's column chunk at a time,
so a file larger than memory streams through (what stays resident is about one row group's
text). Documents are named `file:row` (1-based), as JSON Lines documents are `file:line`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from spmd.errors import SpmdError

SUFFIX = ".parquet"
BATCH_ROWS = 1024


def is_parquet(path: Path) -> bool:
    return path.suffix == SUFFIX


def documents(path: Path, name: str) -> Iterator[tuple[str, str]]:
    """`(name:row, text)` for every row; null texts come out empty (and are dropped)."""
    import pyarrow as pa  # imported here: only Parquet corpora need it

    source = _open(path)
    row = 0
    try:
        for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=["text"]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield f"{name}:{row}", "" if text is None else str(text)
    except (OSError, pa.ArrowException) as e:
        raise SpmdError(f"--data: cannot read row {row + 1} of {path}: {_first_line(e)}") from None


def _open(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer would keep every row group it read cached (96 MB of a 300 MB corpus
        # after 400k rows, growing); without it, memory stays one batch deep.
        source = pq.ParquetFile(path, pre_buffer=False)
    except (OSError, pa.ArrowException) as e:
        reason = _first_line(e)
        raise SpmdError(f"--data: {path} is not a readable Parquet file: {reason}") from None
    columns = source.schema_arrow.names
    if "text" not in columns:
        raise SpmdError(
            f"--data: {path} has no 'text' column (its columns: {', '.join(columns) or 'none'})"
        )
    kind = source.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SpmdError(f"--data: {path} has a 'text' column of {kind}, not strings")
    return source


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
