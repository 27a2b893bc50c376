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
from jax.sharding import NamedSharding

from spmd import checkpoint as ckpt
from spmd.compiler import cost
from spmd.compiler.program import TrainProgram
from spmd.data import corpus
from spmd.data.loader import PackedLoader
from spmd.data.stream import token_streams
from spmd.data.tokenizer import load_tokenizer
from spmd.distributed import AnyProcess, is_main_process
from spmd.errors import SpmdError
from spmd.layout import Layout
from spmd.parallel import local_sgd
from spmd.rules import Rules
from spmd.train import init_from, monitor, resume
from spmd.train.config import TrainConfig
from spmd.train.lock import RunLock
from spmd.train.outputs import check_output_paths
from spmd.train.state import TrainState
from spmd.train.stop import StopFlag

# Fields a resumed run must share with its checkpoint: they fix the parameters' shapes and
# the batch sequence. The mesh, the step count, the learning rate and the rest may change.
MUST_MATCH = ("model", "overrides", "batch", "seq", "seed", "data", "tokenizer", "local_steps")


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
    program: TrainProgram
    step_fn: object
    eval_fn: object
    state: TrainState
    start_step: int
    loader: PackedLoader
    val_loader: PackedLoader | None
    meta: dict
    data_id: dict = dataclasses.field(default_factory=dict)  # see spmd.train.resume

    @property
    def layout(self) -> Layout:
        return self.program.layout


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
        cost.model_flops_per_step(r.program.model, r.cfg.batch, r.cfg.seq),
        cost.hardware_of_devices(),
        enabled=is_main_process(),
        header=r.layout.to_json(),
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
    check_output_paths(cfg)  # a bad output path must not cost a compile, or a whole run
    cfg = init_from.resolve(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    cfg = _with_tokenizer_vocab(cfg, tokenizer)
    model = cfg.build_model(tokenizer.vocab_size)
    _check_ckpt_dir(cfg)
    program = TrainProgram.for_tokens(
        model,
        Layout.make(cfg.mesh, rules),
        cfg.batch,
        cfg.seq,
        grad_accum=cfg.grad_accum,
        optimizer=cfg.optimizer_config(),
        local=cfg.local_sgd(),
        pipeline=cfg.pipeline(),
    )
    rows = process_rows(program.batch_shardings["inputs"], program.shapes["inputs"])
    loader, val_loader, data_id = _loaders(cfg, tokenizer, rows)
    compiled = program.compile()
    state, start_step, meta = _initial_state(cfg, program, loader, data_id)
    layout = program.layout
    _log(
        f"model {model.name}: {model.n_params:,} parameters | mesh {layout.spec} on "
        f"{layout.devices} devices | batch {cfg.batch}x{cfg.seq} | "
        f"compiled in {compiled.compile_s:.1f}s"
    )
    eval_fn = program.eval_loss() if val_loader else None
    return Run(
        cfg, program, compiled, eval_fn, state, start_step, loader, val_loader, meta, data_id
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
    streams = token_streams(corpus.iter_documents(cfg.data), tokenizer)  # one lazy pass
    data_id = resume.data_identity(cfg.data, streams.sha256)
    loader = PackedLoader(streams.train, cfg.batch, cfg.seq, cfg.seed, rows)
    if not cfg.eval_every:
        return loader, None, data_id
    val_tokens = streams.val
    if len(val_tokens) <= cfg.batch * cfg.seq:
        raise SpmdError(
            f"--eval-every needs a validation split of more than {cfg.batch}x{cfg.seq} tokens, "
            f"but the held-out documents of {cfg.data or 'the stdlib'} have {len(val_tokens)}; "
            "give more documents (a folder or a .jsonl) or drop --eval-every"
        )
    val_loader = PackedLoader(val_tokens, cfg.batch, cfg.seq, 0, rows, shuffle=False, prefetch=0)
    return loader, val_loader, data_id


def _initial_state(cfg: TrainConfig, program: TrainProgram, loader: PackedLoader, data_id):
    """A fresh state, or with --resume the newest valid checkpoint resharded onto the layout."""
    rng = jax.random.key(cfg.seed)
    abstract = program.abstract_state
    found = ckpt.restore_train_state(cfg.ckpt_dir, abstract, set_aside=True) if cfg.resume else None
    if found is None:
        if cfg.resume:
            ckpt.warn(f"--resume: no checkpoint in {cfg.ckpt_dir} yet; starting from step 0")
        init_key, rng = jax.random.split(rng)
        if cfg.init_from:
            return init_from.start_state(program, cfg.init_from), 0, {"rng": _key_to_json(rng)}
        return program.init_state(init_key), 0, {"rng": _key_to_json(rng)}
    step, state, meta, saved = found
    _check_compatible(cfg, saved, step)
    resume.check_same_data(data_id, saved, step)
    ckpt.set_aside_newer(cfg.ckpt_dir, step)  # the fallback's warnings named the new names
    loader.set_state(meta["loader"])
    _log(f"resumed from {cfg.ckpt_dir} step {step} (saved on mesh {saved['mesh']})")
    return state, step, meta


def _check_compatible(cfg: TrainConfig, saved: dict, step: int) -> None:
    mine = cfg.to_json()
    for name in MUST_MATCH:
        if name == "data" and not resume.compares_data_by_path(saved):
            continue  # its content's fingerprint decides, once the data is loaded
        a, b = _canonical(name, mine.get(name)), _canonical(name, saved.get(name))
        if a != b:
            raise SpmdError(
                f"--resume: {name}={a!r} differs from {b!r} in the checkpoint at step {step}; "
                "use the run's settings or a new --ckpt-dir"
            )
    if cfg.local_steps:
        local_sgd.check_same_workers(cfg.mesh, saved.get("mesh"), step)


def _canonical(name: str, value):
    if name == "overrides":
        return sorted((str(k), str(v)) for k, v in (value or []))
    return value


def _key_to_json(key) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()]


def _device_batch(r: Run, arrays: dict[str, np.ndarray]) -> dict:
    return device_batch(arrays, r.program.batch_shardings, r.program.shapes)


def _evaluate(r: Run, params) -> float:
    """Mean loss over the first `eval_batches` validation batches (the same ones each time)."""
    losses = [
        r.eval_fn(params, _device_batch(r, r.val_loader.batch_at(i)))
        for i in range(r.cfg.eval_batches)
    ]
    return float(np.mean(jax.device_get(losses)))


def _loop(r: Run, mon: monitor.Monitor, checkpointer, stop: StopFlag) -> int:
    cfg, state, pending, step = r.cfg, r.state, None, r.start_step
    any_process = AnyProcess()  # processes must all stop (and save) at the same step
    for step in range(r.start_step + 1, cfg.steps + 1):
        batch = _device_batch(r, r.loader.next())
        state, metrics = r.step_fn(state, batch, step)
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
    layout = r.layout.to_json()
    meta = {"loader": r.loader.get_state(), "rng": r.meta["rng"], "mesh": layout["mesh"]}
    checkpointer.save(step, state, meta, {**r.cfg.to_json(), **layout, **r.data_id})
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
        "last_row": rows[-1] if rows else {},
        "tokens_per_s": float(np.median([x["tokens_per_s"] for x in steady])) if rows else 0.0,
        "compile_s": r.step_fn.compile_s,
        "stopped_by": signal.Signals(signum).name if signum else None,
    }


def _log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)
