"""spmd.train.resume: a checkpoint knows its data by content, not by how its path was spelled."""

import os

import pytest

from spmd.data import corpus
from spmd.errors import SpmdError
from spmd.train import resume


def test_the_same_file_spelled_two_ways_gives_the_same_documents(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    monkeypatch.chdir(tmp_path)
    relative = corpus.load_documents("data/d.jsonl")
    absolute = corpus.load_documents(str(tmp_path / "data" / "d.jsonl"))
    assert relative == absolute  # names decide the validation split, so they must agree
    assert (
        resume.data_identity("data/./d.jsonl", relative)
        == resume.data_identity(str(tmp_path / "data" / "d.jsonl"), absolute)
        != resume.data_identity("data/d.jsonl", [("x", "alpha")])
    )


def test_different_content_is_refused_in_one_line_naming_both():
    mine = {"data_sha256": "a" * 64, "data_abspath": "/data/x.jsonl"}
    saved = {"data_sha256": "b" * 64, "data_abspath": "/data/x.jsonl"}
    with pytest.raises(SpmdError) as e:
        resume.check_same_data(mine, saved, 10)
    message = str(e.value)
    assert "\n" not in message and "/data/x.jsonl" in message and "step 10" in message
    assert "a" * 12 in message and "b" * 12 in message
    resume.check_same_data(mine, {**saved, "data_sha256": "a" * 64}, 10)


def test_the_default_corpus_is_known_by_its_content():
    """The stdlib's source changes with the Python version while `--data` stays None."""
    docs = corpus.load_documents(None)
    mine = resume.data_identity(None, docs)
    assert mine["data_abspath"] is None and len(mine["data_sha256"]) == 64
    other_python = resume.data_identity(None, [*docs[:-1], (docs[-1][0], docs[-1][1] + "#")])
    with pytest.raises(SpmdError, match="the standard library"):
        resume.check_same_data(mine, other_python, 3)


def test_a_checkpoint_without_a_fingerprint_compares_the_path():
    assert resume.compares_data_by_path({"data": "x.jsonl"})
    assert not resume.compares_data_by_path({"data": "x.jsonl", "data_sha256": "0" * 64})
    resume.check_same_data({"data_sha256": "a" * 64, "data_abspath": os.sep}, {"data": None}, 1)
