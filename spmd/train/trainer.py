"""The host loop: data in, sharded steps out, metrics read one step late, checkpoints.

Reading a step's metrics forces the host to wait for it. Reading step i-1's metrics after
step i has been dispatched keeps one step always queued on the devices. Steps that save a
checkpoint, evaluate or stop read their own metrics at once instead, so a checkpoint is only
ever written after its step's loss, gradients and parameters were seen to be finite.

SIGINT and SIGTERM set a flag; the loop finishes the step it is on, saves it and exits 0.
"""

from __future__ import annotations

import dataclasses
import signal
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from spmd import checkpoint as ckpt
from spmd import params as P
from spmd.data import corpus
from spmd.data.loader import PackedLoader
from spmd.data.tokenizer import load_tokenizer, tokenize_documents
from spmd.distributed import AnyProcess, is_main_process
from spmd.errors import SpmdError
from spmd.mesh import make_mesh
from spmd.models import Model, get_model
from spmd.rules import Rules, sharding_context
from spmd.train import monitor, optim
from spmd.train.lock import RunLock
from spmd.train.state import TrainState, abstract_state, init_state
from spmd.train.step import batch_shardings, compile_step
from spmd.train.stop import StopFlag

# Fields a resumed run must share with its checkpoint: they fix the parameters' shapes and
# the batch sequence. The mesh, the step count, the learning rate and the rest may change.
MUST_MATCH = ("model", "overrides", "batch", "seq", "seed", "data", "tokenizer")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "gpt-tiny"
    overrides: tuple[tuple[str, str], ...] = ()
    mesh: str = "data=-1"
    steps: int = 100
    batch: int = 8
    seq: int = 128
    grad_accum: int = 1
    remat: str = "none"
    dtype: str = "float32"
    lr: float = 1e-3
    warmup: int = 10
    schedule_steps: int | None = None  # the LR schedule's length; default: steps
    seed: int = 0
    data: str | None = None
    tokenizer: str | None = None
    metrics_file: str | None = None
    progress: bool = True
    eval_every: int | None = None
    eval_batches: int = 4
    tensorboard: str | None = None
    plot: str | None = None
    ckpt_dir: str | None = None
    ckpt_every: int = 100
    keep: int = 3
    resume: bool = False
    async_ckpt: bool = True

    def __post_init__(self):
        counts = ("steps", "batch", "seq", "grad_accum", "eval_batches", "ckpt_every", "keep")
        for name in (*counts, "eval_every", "schedule_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SpmdError(f"--{name.replace('_', '-')}={value} must be positive")
        if self.resume and not self.ckpt_dir:
            raise SpmdError("--resume needs --ckpt-dir (where to find the checkpoint)")

    def build_model(self, vocab_size: int | None = None) -> Model:
        model = get_model(
            self.model, {**dict(self.overrides), "remat": self.remat, "compute_dtype": self.dtype}
        )
        if self.seq > model.cfg.max_seq_len:
            raise SpmdError(
                f"--seq={self.seq} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
            )
        if vocab_size and model.cfg.vocab_size < vocab_size:
            raise SpmdError(
                f"vocab_size={model.cfg.vocab_size} is smaller than the tokenizer's "
                f"{vocab_size}; use --set vocab_size={vocab_size}"
            )
        return model

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def device_batch(arrays: dict[str, np.ndarray], shardings, global_shapes=None) -> dict:
    """Global arrays from this process's rows (in one process, its rows are all of them)."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], v, None if global_shapes is None else global_shapes[k]
        )
        for k, v in arrays.items()
    }


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> range:
    """The rows of the global batch that this process's devices hold (one contiguous block)."""
    spans = sorted(
        {
            (idx[0].start or 0, global_shape[0] if idx[0].stop is None else idx[0].stop)
            for idx in sharding.addressable_devices_indices_map(global_shape).values()
        }
    )
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise SpmdError(f"this process's rows {spans} of the batch are not contiguous")
    return range(spans[0][0], spans[-1][1])


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    model: Model
    mesh: jax.sharding.Mesh
    step_fn: object
    eval_fn: object
    state: TrainState
    start_step: int
    loader: PackedLoader
    val_loader: PackedLoader | None
    shardings: dict
    shapes: dict
    meta: dict
    compile_s: float


def run(cfg: TrainConfig, rules: Rules | None = None, argv: list[str] | None = None) -> dict:
    """Train; returns the summary. `argv` (the CLI's) lets a stop say how to resume."""
    with RunLock(cfg.ckpt_dir):  # one run per --ckpt-dir, refused before compiling anything
        return _train(cfg, rules, argv)


def _train(cfg: TrainConfig, rules: Rules | None, argv: list[str] | None) -> dict:
    r = setup(cfg, rules)
    tokens = r.cfg.batch * r.cfg.seq
    mon = monitor.Monitor(
        r.cfg,
        r.start_step,
        tokens,
        tokens * monitor.flops_per_token(r.model, r.cfg.seq),
        monitor.peak_flops(),
        enabled=is_main_process(),
    )
    checkpointer = (
        ckpt.Checkpointer(r.cfg.ckpt_dir, r.cfg.ckpt_every, r.cfg.keep, r.cfg.async_ckpt)
        if r.cfg.ckpt_dir
        else None
    )
    stop = StopFlag()
    with stop:  # until the last save is written: a second SIGTERM must not cut it short
        try:
            last_step = _loop(r, mon, checkpointer, stop)
        finally:
            mon.close()
            if checkpointer:
                stop.saving = checkpointer.in_flight
                checkpointer.close()  # waits: an error above must not leave a save half-written
    if r.cfg.plot:
        mon.plot(r.cfg.plot)
    summary = _summary(r, mon.rows, last_step, stop.signal)
    if is_main_process():
        monitor.report(r.cfg, summary, argv)
    return summary


def setup(cfg: TrainConfig, rules: Rules | None = None) -> Run:
    tokenizer = load_tokenizer(cfg.tokenizer)
    cfg = _with_tokenizer_vocab(cfg, tokenizer)
    model = cfg.build_model(tokenizer.vocab_size)
    _check_ckpt_dir(cfg)
    mesh = make_mesh(cfg.mesh)
    opt, schedule = optim.make_optimizer(
        optim.OptimConfig(
            lr=cfg.lr, warmup_steps=cfg.warmup, total_steps=cfg.schedule_steps or cfg.steps
        )
    )
    shapes = {k: (cfg.batch, cfg.seq) for k in model.batch_axes}
    step_fn = compile_step(model, opt, schedule, mesh, shapes, rules, cfg.grad_accum)
    shardings = batch_shardings(model, shapes, mesh, rules)
    rows = process_rows(shardings["inputs"], shapes["inputs"])
    loader, val_loader = _loaders(cfg, tokenizer, rows)
    t0 = time.perf_counter()
    abstract = abstract_state(model, opt, mesh, rules)
    compiled = step_fn.lower(abstract, _abstract_batch(shapes, shardings)).compile()
    compile_s = time.perf_counter() - t0
    state, start_step, meta = _initial_state(cfg, model, opt, mesh, rules, abstract, loader)
    _log(
        f"model {model.name}: {P.count(model.specs()):,} parameters | mesh {cfg.mesh} on "
        f"{mesh.devices.size} devices | batch {cfg.batch}x{cfg.seq} | compiled in {compile_s:.1f}s"
    )
    eval_fn = _eval_fn(model, mesh, rules, shardings) if val_loader else None
    return Run(
        cfg,
        model,
        mesh,
        compiled,
        eval_fn,
        state,
        start_step,
        loader,
        val_loader,
        shardings,
        shapes,
        meta,
        compile_s,
    )


def _check_ckpt_dir(cfg: TrainConfig) -> None:
    """Refuse to clobber a run, or to resume a different one, before compiling anything."""
    if not cfg.ckpt_dir:
        return
    if not cfg.resume and ckpt.all_steps(cfg.ckpt_dir):
        raise SpmdError(
            f"--ckpt-dir {cfg.ckpt_dir} already holds checkpoints; add --resume to continue "
            "that run, or choose a new directory"
        )
    if cfg.resume and (step := ckpt.latest_valid_step(cfg.ckpt_dir)) is not None:
        _check_compatible(cfg, ckpt.load_run_config(cfg.ckpt_dir, step), step)


def _with_tokenizer_vocab(cfg: TrainConfig, tokenizer) -> TrainConfig:
    """The model's vocabulary follows a BPE tokenizer's, and the config records it, so
    anything that rebuilds the model from a checkpoint gets the same shapes."""
    if not cfg.tokenizer or "vocab_size" in dict(cfg.overrides):
        return cfg
    vocab = ("vocab_size", str(tokenizer.vocab_size))
    return dataclasses.replace(cfg, overrides=(*cfg.overrides, vocab))


def _loaders(cfg: TrainConfig, tokenizer, rows: range):
    train_docs, val_docs = corpus.split_documents(corpus.load_documents(cfg.data))
    loader = PackedLoader(
        tokenize_documents(train_docs, tokenizer), cfg.batch, cfg.seq, cfg.seed, rows
    )
    if not cfg.eval_every:
        return loader, None
    val_tokens = tokenize_documents(val_docs, tokenizer)
    if len(val_tokens) <= cfg.batch * cfg.seq:
        raise SpmdError(
            f"--eval-every needs a validation split of more than {cfg.batch}x{cfg.seq} tokens, "
            f"but the held-out documents of {cfg.data or 'the stdlib'} have {len(val_tokens)}; "
            "give more documents (a folder or a .jsonl) or drop --eval-every"
        )
    return loader, PackedLoader(val_tokens, cfg.batch, cfg.seq, 0, rows, shuffle=False, prefetch=0)


def _abstract_batch(shapes, shardings):
    return {k: jax.ShapeDtypeStruct(s, np.int32, sharding=shardings[k]) for k, s in shapes.items()}


def _initial_state(cfg, model, opt, mesh, rules, abstract, loader):
    """A fresh state, or with --resume the newest valid checkpoint resharded onto `mesh`."""
    rng = jax.random.key(cfg.seed)
    found = ckpt.restore_train_state(cfg.ckpt_dir, abstract) if cfg.resume else None
    if found is None:
        if cfg.resume:
            ckpt.warn(f"--resume: no checkpoint in {cfg.ckpt_dir} yet; starting from step 0")
        init_key, rng = jax.random.split(rng)
        state = init_state(model, opt, init_key, mesh, rules)
        return state, 0, {"rng": _key_to_json(rng)}
    step, state, meta, saved = found
    _check_compatible(cfg, saved, step)
    for name in ckpt.set_aside_newer(cfg.ckpt_dir, step):
        ckpt.warn(f"moved the invalid newer step aside to {cfg.ckpt_dir}/{name}")
    loader.set_state(meta["loader"])
    _log(f"resumed from {cfg.ckpt_dir} step {step} (saved on mesh {saved['mesh']})")
    return state, step, meta


def _check_compatible(cfg: TrainConfig, saved: dict, step: int) -> None:
    mine = cfg.to_json()
    for name in MUST_MATCH:
        a, b = _canonical(name, mine.get(name)), _canonical(name, saved.get(name))
        if a != b:
            raise SpmdError(
                f"--resume: {name}={a!r} differs from {b!r} in the checkpoint at step {step}; "
                "use the run's settings or a new --ckpt-dir"
            )


def _canonical(name: str, value):
    if name == "overrides":
        return sorted((str(k), str(v)) for k, v in (value or []))
    return value


def _key_to_json(key) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()]


def _eval_fn(model, mesh, rules, shardings):
    param_sh = P.shardings(model.specs(), mesh, rules)

    def loss(params, batch):
        with sharding_context(mesh, rules):
            return model.loss(params, batch)

    return jax.jit(
        loss, in_shardings=(param_sh, shardings), out_shardings=NamedSharding(mesh, PartitionSpec())
    )


def _evaluate(r: Run, params) -> float:
    """Mean loss over the first `eval_batches` validation batches (the same ones each time)."""
    losses = [
        r.eval_fn(params, device_batch(r.val_loader.batch_at(i), r.shardings, r.shapes))
        for i in range(r.cfg.eval_batches)
    ]
    return float(np.mean(jax.device_get(losses)))


def _loop(r: Run, mon: monitor.Monitor, checkpointer, stop: StopFlag) -> int:
    cfg, state, pending, step = r.cfg, r.state, None, r.start_step
    any_process = AnyProcess()  # processes must all stop (and save) at the same step
    for step in range(r.start_step + 1, cfg.steps + 1):
        batch = device_batch(r.loader.next(), r.shardings, r.shapes)
        state, metrics = r.step_fn(state, batch)
        stopping = any_process(stop.signal is not None)
        if pending is not None:
            mon.write(mon.fetch(*pending))
        pending = (step, metrics)
        evaluate = bool(r.eval_fn) and (step % cfg.eval_every == 0 or step == cfg.steps)
        save = checkpointer is not None and (
            checkpointer.due(step) or step == cfg.steps or stopping
        )
        if evaluate or save or stopping:
            row, pending = mon.fetch(*pending), None  # finite, so safe to save
            if evaluate:
                row["eval_loss"] = _evaluate(r, state.params)
            if save:
                row["ckpt_blocked_s"] = _save(r, checkpointer, step, state)
            mon.write(row)
        if stopping:
            break
    if pending is not None:
        mon.write(mon.fetch(*pending))
    return step


def _save(r: Run, checkpointer, step: int, state) -> float:
    """Start a save; returns how long the loop was blocked (the async write goes on)."""
    t0 = time.perf_counter()
    meta = {"loader": r.loader.get_state(), "rng": r.meta["rng"], "mesh": r.cfg.mesh}
    checkpointer.save(step, state, meta, {**r.cfg.to_json(), "mesh": r.cfg.mesh})
    return time.perf_counter() - t0


def _summary(r: Run, rows: list[dict], last_step: int, signum: int | None) -> dict:
    steady = rows[2:] or rows
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    return {
        "steps": len(rows),
        "start_step": r.start_step,
        "last_step": last_step,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "eval_loss": evals[-1] if evals else None,
        "tokens_per_s": float(np.median([x["tokens_per_s"] for x in steady])) if rows else 0.0,
        "compile_s": r.compile_s,
        "stopped_by": signal.Signals(signum).name if signum else None,
    }


def _log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)
