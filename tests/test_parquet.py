"""Parquet corpora: the same documents and batches as JSON Lines, streamed a record batch at
a time, fingerprinted for resume, and refused in one line when unreadable."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jsonl_corpus, run_spmd

from spmd.checkpoint import load_run_config
from spmd.cli import main
from spmd.data import corpus, parquet
from spmd.data.loader import PackedLoader
from spmd.data.stream import token_streams
from spmd.data.tokenizer import ByteTokenizer, tokenize_documents
from spmd.errors import SpmdError

TRAIN = ["train", "--model", "gpt-tiny", "--set", "n_layers=2,d_model=64", "--no-progress",
         "--batch", "8", "--seq", "32"]  # fmt: skip


def parquet_copy(jsonl: str, out, row_group_size: int = 37) -> str:
    """The JSONL corpus's texts as a Parquet `text` column (plus an `id`), in small row
    groups so that reading crosses many of them."""
    with open(jsonl) as f:
        texts = [json.loads(line)["text"] for line in f]
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, out, row_group_size=row_group_size)
    return str(out)


@pytest.fixture
def corpora(tmp_path):
    jsonl = jsonl_corpus(tmp_path / "c.jsonl")
    return jsonl, parquet_copy(jsonl, tmp_path / "c.parquet")


def test_a_parquet_copy_holds_the_same_documents(corpora):
    jsonl, pq_path = corpora
    a, b = corpus.load_documents(jsonl), corpus.load_documents(pq_path)
    assert [t for _, t in a] == [t for _, t in b] and len(b) == 300
    assert [n.replace(".jsonl", ".parquet") for n, _ in a] == [n for n, _ in b]  # file:row


def test_the_loader_yields_the_same_batches_from_a_parquet_copy(corpora):
    """Unsplit (the split hashes names, and the copies' names differ by suffix), the two
    token streams are one stream, so the seeded loader's batches agree, resumed or not."""
    tok = ByteTokenizer()
    a, b = (token_streams(corpus.iter_documents(p), tok, val_fraction=0) for p in corpora)
    np.testing.assert_array_equal(a.train, b.train)
    loaders = [PackedLoader(s.train, 4, 32, seed=7, prefetch=0) for s in (a, b)]
    for _ in range(5):
        x, y = (ld.next() for ld in loaders)
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    resumed = PackedLoader(b.train, 4, 32, seed=7, prefetch=0)
    resumed.set_state(loaders[0].get_state())
    np.testing.assert_array_equal(resumed.next()["inputs"], loaders[0].next()["inputs"])


def test_streaming_equals_the_in_memory_split_and_fingerprint(corpora):
    _, pq_path = corpora
    tok = ByteTokenizer()
    streams = token_streams(corpus.iter_documents(pq_path), tok)
    docs = corpus.load_documents(pq_path)
    train, val = corpus.split_documents(docs)
    assert val and streams.documents == len(docs)
    np.testing.assert_array_equal(streams.train, tokenize_documents(train, tok))
    np.testing.assert_array_equal(streams.val, tokenize_documents(val, tok))
    assert streams.sha256 == corpus.fingerprint(docs)
    assert isinstance(streams.train, np.memmap)  # on disk, not in memory


def test_the_fingerprint_covers_parquet_content(corpora, tmp_path):
    _, pq_path = corpora
    table = pq.read_table(pq_path)
    texts = table.column("text").to_pylist()
    texts[150] += "!"
    edited = tmp_path / "edited" / "c.parquet"
    edited.parent.mkdir()
    pq.write_table(table.set_column(1, "text", pa.array(texts)), edited, row_group_size=37)
    assert corpus.fingerprint(corpus.iter_documents(str(edited))) != corpus.fingerprint(
        corpus.iter_documents(pq_path)
    )


def test_parquet_is_read_one_record_batch_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(5000)]}), path,
                   row_group_size=500)  # fmt: skip
    reads = []
    iter_batches = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            reads.append((batch.num_rows, batch.schema.names))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    docs = corpus.iter_documents(str(path))
    assert next(docs) == ("big.parquet:1", "row 0")
    assert reads == [(parquet.BATCH_ROWS, ["text"])]  # one batch, and only the text column
    assert sum(1 for _ in docs) == 4999 and len(reads) == -(-5000 // parquet.BATCH_ROWS)


def test_folders_mix_parquet_and_text_files(corpora, tmp_path):
    (tmp_path / "notes.txt").write_text("plain text")
    names = [n for n, _ in corpus.load_documents(str(tmp_path))]
    assert names[:2] == ["c.jsonl:1", "c.jsonl:2"] and "notes.txt" in names
    assert "c.parquet:300" in names and len(names) == 601


def fails_cleanly(capsys, argv, message):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_parquet_file_without_a_text_column_is_refused(capsys, tmp_path):
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["a"], "lang": ["en"]}), path)
    message = f"--data: {path} has no 'text' column (its columns: body, lang)"
    fails_cleanly(capsys, [*TRAIN, "--data", str(path)], message)
    with pytest.raises(SpmdError, match="not strings"):
        pq.write_table(pa.table({"text": [1, 2]}), path)
        corpus.load_documents(str(path))


def test_a_corrupt_parquet_file_is_refused(capsys, corpora, tmp_path):
    _, pq_path = corpora
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(open(pq_path, "rb").read()[:-100])  # the footer is gone
    fails_cleanly(capsys, [*TRAIN, "--data", str(broken)], f"--data: {broken} is not a readable")


@pytest.mark.slow
def test_train_and_resume_on_parquet(corpora, tmp_path, env):
    _, pq_path = corpora
    ckpt = str(tmp_path / "ckpt")
    args = [*TRAIN, "--data", pq_path, "--ckpt-dir", ckpt, "--mesh", "fsdp=4,tensor=2",
            "--devices", "8"]  # fmt: skip
    first = run_spmd(*args, "--steps", "2", env=env)
    assert first.returncode == 0, first.stderr
    again = run_spmd(*args, "--steps", "3", "--resume", env=env)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step 2" in again.stdout
    config = load_run_config(ckpt, 3)
    streams = token_streams(corpus.iter_documents(pq_path), ByteTokenizer())
    assert config["data_sha256"] == streams.sha256


def test_corruption_inside_a_file_is_named_with_its_row(tmp_path):
    """The rows before the damage stream out first (reading is lazy); the damage itself
    is one line naming the file and the row, never a pyarrow traceback."""
    path = tmp_path / "mid.parquet"
    texts = [f"document number {i} " * 20 for i in range(4000)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=500, compression="zstd")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes((b * 7 + 13) % 256 for b in data[middle : middle + 2000])
    path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(SpmdError, match=rf"cannot read row \d+ of {path}") as e:
        seen.extend(corpus.iter_documents(str(path)))
    assert "\n" not in str(e.value)
    row = int(str(e.value).split("row ")[1].split()[0])
    assert 1 < row < 4000 and len(seen) == row - 1  # every row before it came out
