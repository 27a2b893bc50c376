"""Is the data a resumed run reads the data its checkpoint was trained on?

`--data` names the data, but its text does not identify it: `data/x.jsonl` and
`/home/me/data/x.jsonl` are one file, and the default corpus (the running Python's
standard library) changes with the Python version under the same name (none). So a
checkpoint's config records a sha256 of the documents' names and texts, and the absolute
path for people to read; a resume compares the fingerprints. Checkpoints written before
fingerprints existed have none, and compare `--data` by its text, as they did then.
"""

from __future__ import annotations

import os

from spmd.data import corpus
from spmd.data.corpus import Document
from spmd.errors import SpmdError


def data_identity(path: str | None, docs: list[Document] | str) -> dict:
    """What a checkpoint's config records about the data (computed once, at loading):
    `docs` are the documents, or their `corpus.fingerprint` already taken while streaming."""
    return {
        "data_sha256": docs if isinstance(docs, str) else corpus.fingerprint(docs),
        "data_abspath": os.path.abspath(path) if path else None,
    }


def compares_data_by_path(saved: dict) -> bool:
    """A checkpoint from before fingerprints: `--data` is compared as text."""
    return "data_sha256" not in saved


def check_same_data(mine: dict, saved: dict, step: int) -> None:
    """Refuse, in one line, to resume on data whose content differs from the checkpoint's."""
    if compares_data_by_path(saved) or saved["data_sha256"] == mine["data_sha256"]:
        return
    raise SpmdError(
        f"--resume: the data {_name(mine)} (sha256 {mine['data_sha256'][:12]}) differs from "
        f"the data of the checkpoint at step {step}, {_name(saved)} (sha256 "
        f"{saved['data_sha256'][:12]}); use the run's data or a new --ckpt-dir"
    )


def _name(identity: dict) -> str:
    return identity.get("data_abspath") or "the standard library (the default corpus)"
