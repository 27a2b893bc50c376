"""`spmd tokenizer train --data PATH --vocab N --out FILE`: a byte-level BPE for --tokenizer."""

from __future__ import annotations

from spmd.cli import positive_int

RUNS_JAX = False


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a BPE tokenizer")
    actions = p.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a byte-level BPE on a corpus")
    train.add_argument(
        "--data", help="a text file, folder, glob or .jsonl (default: Python stdlib)"
    )
    train.add_argument("--vocab", type=positive_int, required=True, help="vocabulary size")
    train.add_argument("--out", required=True, help="where to write the tokenizer JSON")


def run(args) -> int:
    from spmd.data import corpus
    from spmd.data.tokenizer import load_tokenizer, train_bpe
    from spmd.train.outputs import check_output_file

    check_output_file("--out", args.out, "tokenizer.json")  # before the corpus is read
    # Trained on the training split only, so the held-out documents stay unseen.
    train_docs, _ = corpus.split_documents(corpus.load_documents(args.data))
    size = train_bpe((text for _, text in train_docs), args.vocab, args.out)
    padded = load_tokenizer(args.out).vocab_size
    print(
        f"wrote {args.out}: {size} tokens (the model's vocabulary pads to {padded}); "
        f"use it with: spmd train --tokenizer {args.out}"
    )
    return 0
