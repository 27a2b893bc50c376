"""The `spmd` command.

Each subcommand is a module in `spmd/commands/` with `add_parser(sub)` and `run(args)`.
Bad input ends with one line on stderr and exit status 2 (`SpmdError`, or a usage error);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spmd.errors import SaveFailed, SpmdError

# name -> module; modules are imported when the parser is built, JAX's backend is not.
COMMANDS = {
    "train": "spmd.commands.train",
    "models": "spmd.commands.models",
    "explain": "spmd.commands.explain",
    "plan": "spmd.commands.plan",
    "checkpoint": "spmd.commands.checkpoint",
    "tokenizer": "spmd.commands.tokenizer",
    "launch": "spmd.commands.launch",
    "generate": "spmd.commands.generate",
    "convert": "spmd.commands.convert",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SpmdError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """argparse type for counts (steps, devices, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="spmd", description="A JAX SPMD training engine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modules = {name: importlib.import_module(path) for name, path in COMMANDS.items()}
    for module in modules.values():
        module.add_parser(sub)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    try:
        parser, modules = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "devices", None):
            from spmd.mesh import simulate_cpu_devices

            simulate_cpu_devices(args.devices)
        from spmd import distributed

        if getattr(modules[args.command], "RUNS_JAX", True):
            distributed.initialize()  # joins a multi-process job if there is one; else no-op
        elif distributed.job_rank() != 0:
            return 0  # a command that does not join the job runs once, on rank 0
        return modules[args.command].run(args)
    except SpmdError as e:
        msg = str(e)
        print(msg if msg.startswith("spmd") else f"spmd: error: {msg}", file=sys.stderr)
        if isinstance(e, SaveFailed):
            _exit_now(2)
        return 2
    except KeyboardInterrupt:
        print("spmd: interrupted", file=sys.stderr)
        return 130


def _exit_now(status: int) -> None:
    """Exit without joining orbax's stuck threads; the run's own files are closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
