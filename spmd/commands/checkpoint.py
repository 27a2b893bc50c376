"""`spmd checkpoint info DIR`: the steps in a checkpoint folder, their sizes and validity."""

from __future__ import annotations

import json
from pathlib import Path

RUNS_JAX = True  # reading arrays to verify them starts JAX's backend


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect checkpoints")
    actions = p.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="list the steps, the config, sizes and validity")
    info.add_argument("dir", help="a --ckpt-dir")
    info.add_argument(
        "--quick", action="store_true", help="check only the metadata, not every array's bytes"
    )
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
    check = ckpt.step_problem if args.quick else ckpt.verify_step
    rows = [
        {"step": s, "bytes": ckpt.disk_bytes(args.dir, s), "problem": check(args.dir, s)}
        for s in steps
    ]
    valid = [r["step"] for r in rows if r["problem"] is None]
    config = ckpt.load_run_config(args.dir, valid[-1]) if valid else None
    if args.json:
        print(
            json.dumps(
                {
                    "dir": args.dir,
                    "steps": rows,
                    "latest_valid": (valid or [None])[-1],
                    "config": config,
                }
            )
        )
        return 0
    print(f"{args.dir}: {len(steps)} steps, {len(valid)} valid")
    for r in rows:
        state = "valid" if r["problem"] is None else f"INVALID: {r['problem']}"
        print(f"  step {r['step']:>8}  {r['bytes'] / 1e6:10.2f} MB  {state}")
    if config:
        print(f"config (step {valid[-1]}):")
        for key, value in config.items():
            print(f"  {key}: {value}")
    return 0
