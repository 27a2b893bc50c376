"""Corpus sources, tokenizers, splits and the packed grain loader."""

import json

import jax
import numpy as np
import pytest

from spmd import cli
from spmd.data import corpus
from spmd.data.loader import PackedLoader
from spmd.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
    tokenize_documents,
    train_bpe,
)
from spmd.errors import SpmdError
from spmd.layout import Layout
from spmd.models import get_model
from spmd.train.trainer import device_batch, process_rows


def _jsonl(path, n=60):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"doc {i}: " + f"def f(x): return x * {i}\n" * 20}) + "\n")
    return str(path)


# ---------------------------------------------------------------- sources


def test_stdlib_is_the_default_source():
    docs = corpus.load_documents(None)
    assert len(docs) > 100
    assert any(name.endswith("os.py") for name, _ in docs)


def test_sources_file_folder_glob_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert corpus.load_documents(str(tmp_path / "a.txt")) == [("a.txt", "alpha")]
    assert corpus.load_documents(str(tmp_path)) == [("a.txt", "alpha"), ("sub/b.md", "beta")]
    assert corpus.load_documents(str(tmp_path / "**" / "*.md")) == [("sub/b.md", "beta")]
    docs = corpus.load_documents(_jsonl(tmp_path / "d.jsonl", 3))
    assert len(docs) == 3 and docs[0][1].startswith("doc 0:") and docs[0][0] == "d.jsonl:1"


def test_document_names_do_not_depend_on_where_the_corpus_lives(tmp_path, monkeypatch):
    """Names decide the validation split: a relative path, an absolute one and a moved copy
    of the same folder give the same documents."""
    for where in ("a", "b/c"):
        (tmp_path / where / "sub").mkdir(parents=True)
        (tmp_path / where / "sub" / "x.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    docs = corpus.load_documents("a")
    assert docs == corpus.load_documents(str(tmp_path / "a")) == corpus.load_documents("b/c")
    assert corpus.fingerprint(docs) == corpus.fingerprint(corpus.load_documents("b/c"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty.txt").write_text("  \n") and p / "empty.txt", "holds no text"),
        (lambda p: (p / "e").mkdir() or p / "e", "no text files"),
        (lambda p: p / "*.nothing", "matches no files"),
        (lambda p: (p / "bad.jsonl").write_text('{"txt": 1}\n') and p / "bad.jsonl", "'text'"),
    ],
)
def test_bad_sources_raise_one_clear_line(tmp_path, make, message):
    with pytest.raises(SpmdError, match=message) as e:
        corpus.load_documents(str(make(tmp_path)))
    assert "\n" not in str(e.value)


def test_validation_split_is_by_document_and_stable():
    docs = [(f"doc{i}.py", f"text {i}") for i in range(500)]
    train, val = corpus.split_documents(docs)
    assert val and len(val) < len(docs) // 10
    assert not {n for n, _ in train} & {n for n, _ in val}
    # The split follows each document's name, not its position.
    train2, val2 = corpus.split_documents(docs[::-1])
    assert sorted(val2) == sorted(val) and sorted(train2) == sorted(train)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_and_pads_vocab():
    tok = ByteTokenizer()
    text = "héllo\nwörld ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size % 128 == 0 and tok.vocab_size > tok.eos_id
    stream = tokenize_documents([("a", "ab"), ("b", "c")], tok)
    np.testing.assert_array_equal(stream, [97, 98, 256, 99, 256])


def test_bpe_trains_round_trips_and_pads(tmp_path):
    texts = [t for _, t in corpus.load_documents(_jsonl(tmp_path / "d.jsonl"))]
    out = str(tmp_path / "tok.json")
    size = train_bpe(texts, 400, out)
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer)
    assert 257 < size <= 400
    assert tok.vocab_size % 128 == 0 and size <= tok.vocab_size < size + 128
    sample = "def f(x): return x * 7\nünïcode"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode())  # merges learned from the corpus compress it
    stream = tokenize_documents([("a", "def"), ("b", "x")], tok)
    assert stream[-1] == tok.eos_id and (stream == tok.eos_id).sum() == 2


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(SpmdError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpmdError, match="not a tokenizers JSON"):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(SpmdError, match="--vocab"):
        train_bpe(["abc"], 10, str(tmp_path / "t.json"))


def test_tokenizer_train_command(tmp_path, capsys):
    out = tmp_path / "t.json"
    data = _jsonl(tmp_path / "d.jsonl")
    assert (
        cli.main(["tokenizer", "train", "--data", data, "--vocab", "300", "--out", str(out)]) == 0
    )
    assert "--tokenizer" in capsys.readouterr().out
    assert json.loads(out.read_text())["model"]["type"] == "BPE"


# ---------------------------------------------------------------- loader


def _batches(loader, n):
    return [loader.next() for _ in range(n)]


def test_loader_is_deterministic_from_the_seed():
    tokens = np.arange(5000, dtype=np.int32)
    a, b, c = (PackedLoader(tokens, 4, 16, seed) for seed in (1, 1, 2))
    for x, y, z in zip(_batches(a, 5), _batches(b, 5), _batches(c, 5), strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        assert not np.array_equal(x["inputs"], z["inputs"])
        np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
        assert x["inputs"].shape == (4, 16) and x["inputs"].dtype == np.int32


def test_each_epoch_is_a_fresh_permutation_of_the_windows():
    tokens = np.arange(16 * 12 + 1, dtype=np.int32)
    loader = PackedLoader(tokens, 4, 16, seed=0)  # 12 windows: 3 batches an epoch
    starts = [b["inputs"][:, 0] // 16 for b in _batches(loader, 6)]
    first, second = np.concatenate(starts[:3]), np.concatenate(starts[3:])
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
    assert not np.array_equal(first, second)


def test_loader_resumes_mid_epoch_to_the_exact_next_batch():
    tokens = np.arange(16 * 40 + 1, dtype=np.int32)
    loader = PackedLoader(tokens, 4, 16, seed=3)  # 10 batches an epoch
    _batches(loader, 13)  # into the second epoch
    state = loader.get_state()
    expected = _batches(loader, 4)
    resumed = PackedLoader(tokens, 4, 16, seed=3)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives JSON
    assert state == {"next_batch": 13}
    for x, y in zip(expected, _batches(resumed, 4), strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_process_rows_are_slices_of_the_global_batch():
    tokens = np.arange(3000, dtype=np.int32)
    full = _batches(PackedLoader(tokens, 8, 16, 0), 3)
    for rows in (range(0, 4), range(4, 8), range(2, 3)):
        part = _batches(PackedLoader(tokens, 8, 16, 0, rows=rows, prefetch=0), 3)
        for f, p in zip(full, part, strict=True):
            np.testing.assert_array_equal(p["inputs"], f["inputs"][rows.start : rows.stop])


def test_global_batch_is_independent_of_the_mesh():
    model = get_model("gpt-tiny")
    tokens = np.arange(6000, dtype=np.int32) % 384
    shapes = {k: (8, 16) for k in model.batch_axes}
    seen = []
    for spec, devices in (("fsdp=8", 8), ("data=2,tensor=4", 8), ("data=1", 1)):
        layout = Layout.make(spec, devices=jax.devices()[:devices])
        shardings = layout.batch_shardings(model.batch_axes, shapes)
        rows = process_rows(shardings["inputs"], shapes["inputs"])
        assert rows == range(8)  # one process holds every row
        loader = PackedLoader(tokens, 8, 16, seed=5, rows=rows)
        batches = [device_batch(loader.next(), shardings, shapes) for _ in range(3)]
        assert batches[0]["inputs"].sharding == shardings["inputs"]
        seen.append([np.asarray(b["inputs"]) for b in batches])
    for other in seen[1:]:
        for x, y in zip(seen[0], other, strict=True):
            np.testing.assert_array_equal(x, y)


def test_loader_refuses_too_little_data():
    with pytest.raises(SpmdError, match="too few for one batch"):
        PackedLoader(np.arange(100, dtype=np.int32), 8, 16, 0)
