"""`spmd checkpoint info DIR`: the steps in a checkpoint folder, their sizes and validity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS_JAX = True  # orbax, which reads the config, starts JAX


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect checkpoints")
    actions = p.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="list the steps, the config, sizes and validity")
    info.add_argument("dir", help="a --ckpt-dir")
    info.add_argument(
        "--verify",
        action="store_true",
        help="also read every array's bytes, one block at a time (slow; catches truncation)",
    )
    # The default used to read every array; --quick asked for metadata only, now the default.
    info.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    info.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from spmd import checkpoint as ckpt
    from spmd.errors import SpmdError

    if not Path(args.dir).is_dir():
        problem = "is a file, not a folder" if Path(args.dir).exists() else "does not exist"
        raise SpmdError(f"checkpoint directory {args.dir} {problem}")
    steps = ckpt.all_steps(args.dir)
    if not steps:
        raise SpmdError(f"{args.dir} holds no checkpoint steps")
    rows = [_row(ckpt, args.dir, s, args.verify) for s in steps]
    valid = [r["step"] for r in rows if r["problem"] is None]
    config = ckpt.load_run_config(args.dir, valid[-1]) if valid else None
    if args.json:
        latest = (valid or [None])[-1]
        info = {"dir": args.dir, "steps": rows, "latest_valid": latest, "config": config}
        print(json.dumps(info))
        return 0
    unread = sum(1 for r in rows if r["unverified"])
    counts = f"{len(valid) - unread} valid" + (f", {unread} not verified" if unread else "")
    print(f"{args.dir}: {len(steps)} steps, {counts}" + _checked(args.verify))
    for r in rows:
        print(f"  step {r['step']:>8}  {r['bytes'] / 1e6:10.2f} MB  {_state(r)}")
    if config:
        print(f"config (step {valid[-1]}):")
        for key, value in config.items():
            print(f"  {key}: {value}")
    return 0


def _row(ckpt, directory: str, step: int, verify: bool) -> dict:
    """`problem` says why the step is invalid; `unverified` why its arrays could not be read
    (out of memory, no permission: no verdict on the step, which stays valid)."""
    row = {"step": step, "bytes": ckpt.disk_bytes(directory, step), "verified": verify}
    try:
        check = ckpt.verify_step if verify else ckpt.step_problem
        row["problem"], row["unverified"] = check(directory, step), None
    except ckpt.CouldNotVerify as e:
        row["problem"], row["unverified"] = None, str(e)
    except OSError as e:  # the metadata itself was unreadable: no verdict either
        row["problem"], row["unverified"] = None, f"{e.strerror or e}: {e.filename}"
    return row


def _checked(verify: bool) -> str:
    return " (every array read)" if verify else " (metadata only; --verify reads every array)"


def _state(row: dict) -> str:
    if row["problem"] is not None:
        return f"INVALID: {row['problem']}"
    return f"could not verify: {row['unverified']}" if row["unverified"] else "valid"
