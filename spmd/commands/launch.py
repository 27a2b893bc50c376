"""`spmd launch -n P -- spmd <command> ...`: P local processes, one jax.distributed job.

Each process gets its rank through the SPMD_* variables that `spmd.distributed.initialize`
reads, and its own simulated CPU devices. Their output comes back line by line, prefixed
with the rank.

JAX notices a dead process only after its heartbeat timeout (100 s by default), and then
aborts the survivors. The launcher does not wait for that: as soon as one process fails it
ends the others, then exits with the failed rank's status.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from spmd.cli import positive_int
from spmd.distributed import (
    ENV_COORDINATOR,
    ENV_DEVICES_PER_PROCESS,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
)
from spmd.errors import SpmdError

RUNS_JAX = False  # the launcher only starts processes; they run JAX
HOST = "127.0.0.1"
STOP_GRACE_S = 5.0  # from SIGTERM to SIGKILL when ending the survivors of a failure
INTERRUPT_GRACE_S = 60.0  # from a forwarded Ctrl-C or SIGTERM to SIGKILL: time to save


def add_parser(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="run an spmd command as P local processes of one jax.distributed job",
        description="example: spmd launch -n 2 --devices-per-process 4 -- spmd train ...",
    )
    p.add_argument("-n", "--nprocs", type=positive_int, required=True, help="processes")
    p.add_argument(
        "--devices-per-process",
        type=positive_int,
        default=1,
        help="simulated CPU devices in each process (default 1)",
    )
    p.add_argument("--port", type=int, help=f"coordinator port on {HOST} (default: a free one)")
    p.add_argument("argv", nargs="...", metavar="-- spmd COMMAND ...", help="what to run")


def run(args) -> int:
    command = child_command(args.argv)
    port = coordinator_port(args.port)
    procs = [
        _spawn(command, rank, args.nprocs, args.devices_per_process, port)
        for rank in range(args.nprocs)
    ]
    return Supervisor(procs).run()


def child_command(argv: list[str]) -> list[str]:
    """The spmd arguments after `--`, checked as the processes would parse them."""
    from spmd.cli import build_parser

    argv = argv[1:] if argv[:1] == ["--"] else argv
    if not argv:
        raise SpmdError("spmd launch: give the command to run after --, e.g. -- spmd train")
    if os.path.basename(argv[0]) != "spmd":
        raise SpmdError(
            f"spmd launch: {argv[0]!r} is not an spmd command; "
            "it runs spmd commands only, e.g. -- spmd train"
        )
    parser, modules = build_parser()
    child = parser.parse_args(argv[1:])  # a usage error ends here, before any process starts
    if child.command == "launch":
        raise SpmdError("spmd launch: the command cannot itself be spmd launch")
    joins_job = getattr(modules[child.command], "RUNS_JAX", True)
    if joins_job and getattr(child, "devices", None):
        raise SpmdError(
            "spmd launch: give the device count as --devices-per-process, not as --devices "
            "in the command"
        )
    return argv[1:]


def coordinator_port(port: int | None) -> int:
    """A free port on loopback: the one asked for, or one the kernel picks."""
    if port is not None and not 0 < port < 65536:
        raise SpmdError(f"spmd launch: --port {port} must be in 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port or 0))
        except OSError as e:
            raise SpmdError(
                f"spmd launch: port {port} on {HOST} is busy ({e.strerror}); "
                "choose another --port or leave it out"
            ) from None
        return s.getsockname()[1]


def child_env(rank: int, nprocs: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env.update(
        {
            ENV_COORDINATOR: f"{HOST}:{port}",
            ENV_NUM_PROCESSES: str(nprocs),
            ENV_PROCESS_ID: str(rank),
            ENV_DEVICES_PER_PROCESS: str(devices),
            "JAX_NUM_CPU_DEVICES": str(devices),
            "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _spawn(command, rank, nprocs, devices, port) -> subprocess.Popen:
    # Its own process group: a terminal's Ctrl-C reaches only the launcher, which forwards
    # it once, and ending a group also ends anything the process started.
    return subprocess.Popen(
        [sys.executable, "-m", "spmd.cli", *command],
        env=child_env(rank, nprocs, devices, port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        process_group=0,
        preexec_fn=_die_with_parent,
    )


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the child before exec: if the launcher is killed outright, so is the child."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervisor:
    """Relays output, forwards signals, and ends every process when one fails."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.exits: queue.Queue[tuple[int, int]] = queue.Queue()
        self.lock = threading.Lock()
        self.width = len(str(len(procs) - 1))
        self.kill_at: float | None = None
        self.interrupted: int | None = None  # the status to exit with, once interrupted
        self.threads = [
            *(self._start(self._relay, r, p.stdout, sys.stdout) for r, p in enumerate(procs)),
            *(self._start(self._relay, r, p.stderr, sys.stderr) for r, p in enumerate(procs)),
        ]
        for rank, proc in enumerate(procs):
            self._start(lambda r=rank, p=proc: self.exits.put((r, p.wait())))

    @staticmethod
    def _start(target, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        return thread

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._wait_all()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._signal_all(signal.SIGKILL)  # nothing outlives the launcher
            for thread in self.threads:
                thread.join(timeout=5)

    def _wait_all(self) -> int:
        failed: tuple[int, int] | None = None
        clean = True
        for _ in self.procs:
            rank, status = self._next_exit()
            clean = clean and status == 0
            if status != 0 and failed is None and not self.interrupted:
                failed = (rank, status)
                self._stop_others(rank, status)
        if self.interrupted and clean:  # `spmd train` saves and exits 0 on Ctrl-C; so do we
            self._say("interrupted; every process stopped cleanly")
            return 0
        if self.interrupted:
            self._say("interrupted; ended every process")
            return self.interrupted
        if failed is None:
            return 0
        return failed[1] if failed[1] > 0 else 128 - failed[1]

    def _next_exit(self) -> tuple[int, int]:
        while True:
            try:
                return self.exits.get(timeout=0.2)
            except queue.Empty:
                if self.kill_at is not None and time.monotonic() > self.kill_at:
                    self._signal_all(signal.SIGKILL)

    def _stop_others(self, rank: int, status: int) -> None:
        alive = sum(p.poll() is None for p in self.procs)
        self._say(
            f"rank {rank} failed first ({describe_status(status)}); "
            f"ending the other {alive} process{'es' if alive != 1 else ''}"
        )
        self._signal_all(signal.SIGTERM)
        self.kill_at = time.monotonic() + STOP_GRACE_S

    def _on_signal(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM (a scheduler's pre-emption) goes to every process, which saves
        and stops; a second signal, or a process slower than the grace period, is killed."""
        if self.interrupted is None:
            self.interrupted = 128 + signum
            self._signal_all(signum)
            self.kill_at = time.monotonic() + INTERRUPT_GRACE_S
        else:
            self._signal_all(signal.SIGKILL)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass  # already gone

    def _relay(self, rank: int, stream, sink) -> None:
        """Copy a process's output, with `[rank] ` at the start of every line.

        Only whole lines go out, so lines of different ranks never mix (an unbuffered print
        writes its text and its newline separately). Progress bars redraw with carriage
        returns, so those end a line too.
        """
        prefix = f"[{rank:>{self.width}}] ".encode()
        partial = b""
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            lines = (partial + chunk).splitlines(keepends=True)
            # A trailing "\r" may be the first half of "\r\n": wait for what follows.
            partial = lines.pop() if not lines[-1].endswith(b"\n") else b""
            self._write(sink, b"".join(prefix + line for line in lines))
        self._write(sink, prefix + partial + b"\n" if partial else b"")
        stream.close()

    def _write(self, sink, data: bytes) -> None:
        if data:
            with self.lock:
                sink.buffer.write(data)
                sink.buffer.flush()

    def _say(self, msg: str) -> None:
        with self.lock:
            print(f"spmd launch: {msg}", file=sys.stderr, flush=True)


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
