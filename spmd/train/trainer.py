"""The host loop: data in, sharded steps out, metrics read one step late.

Reading a step's metrics forces the host to wait for it. Reading step i-1's metrics after
step i has been dispatched keeps one step always queued on the devices.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from spmd import params as P
from spmd.data import corpus
from spmd.data.loader import PackedLoader
from spmd.data.tokenizer import ByteTokenizer, tokenize_documents
from spmd.errors import SpmdError
from spmd.mesh import make_mesh
from spmd.models import Model, get_model
from spmd.rules import Rules
from spmd.train import optim
from spmd.train.state import abstract_state, init_state
from spmd.train.step import batch_shardings, compile_step


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
    seed: int = 0
    data: str | None = None
    metrics_file: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch", "seq", "grad_accum"):
            value = getattr(self, name)
            if value < 1:
                raise SpmdError(f"--{name.replace('_', '-')}={value} must be positive")

    def build_model(self) -> Model:
        model = get_model(
            self.model, {**dict(self.overrides), "remat": self.remat, "compute_dtype": self.dtype}
        )
        if self.seq > model.cfg.max_seq_len:
            raise SpmdError(
                f"--seq={self.seq} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
            )
        return model


def device_batch(arrays: dict[str, np.ndarray], shardings) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (in one process, its rows are all of them)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in arrays.items()}


def run(cfg: TrainConfig, rules: Rules | None = None) -> dict:
    model = cfg.build_model()
    mesh = make_mesh(cfg.mesh)
    tokenizer = ByteTokenizer()
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise SpmdError(
            f"vocab_size={model.cfg.vocab_size} is smaller than the byte "
            f"tokenizer's {tokenizer.vocab_size}"
        )
    train_docs, _ = corpus.split_documents(corpus.load_documents(cfg.data))
    loader = PackedLoader(tokenize_documents(train_docs, tokenizer), cfg.batch, cfg.seq, cfg.seed)
    opt, schedule = optim.make_optimizer(
        optim.OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup, total_steps=cfg.steps)
    )
    shapes = {k: (cfg.batch, cfg.seq) for k in model.batch_axes}
    step_fn = compile_step(model, opt, schedule, mesh, shapes, rules, cfg.grad_accum)
    t0 = time.perf_counter()
    compiled = step_fn.lower(
        abstract_state(model, opt, mesh, rules), _abstract_batch(model, shapes, mesh, rules)
    ).compile()
    compile_s = time.perf_counter() - t0
    state = init_state(model, opt, jax.random.key(cfg.seed), mesh, rules)
    _log(
        f"model {model.name}: {P.count(model.specs()):,} parameters | mesh {cfg.mesh} on "
        f"{mesh.devices.size} devices | batch {cfg.batch}x{cfg.seq} | compiled in "
        f"{compile_s:.1f}s"
    )
    history = _loop(cfg, compiled, state, loader, batch_shardings(model, shapes, mesh, rules))
    return _summary(cfg, history, compile_s)


def _abstract_batch(model, shapes, mesh, rules):
    sh = batch_shardings(model, shapes, mesh, rules)
    return {k: jax.ShapeDtypeStruct(s, np.int32, sharding=sh[k]) for k, s in shapes.items()}


def _loop(cfg: TrainConfig, step_fn, state, loader, shardings) -> list[dict]:
    history: list[dict] = []
    sink = open(_ensure_parent(cfg.metrics_file), "w") if cfg.metrics_file else None
    bar = tqdm(
        total=cfg.steps, disable=not cfg.progress, unit="step", dynamic_ncols=True, file=sys.stderr
    )
    pending, last = None, time.perf_counter()
    try:
        for step in range(1, cfg.steps + 2):
            if step <= cfg.steps:
                state, metrics = step_fn(state, device_batch(loader.next(), shardings))
            if pending is not None:
                fetched = jax.device_get(pending)
                row = {"step": step - 1, **{k: float(v) for k, v in fetched.items()}}
                now = time.perf_counter()
                row["step_time_s"], last = now - last, now
                row["tokens_per_s"] = cfg.batch * cfg.seq / row["step_time_s"]
                _check_finite(row)
                history.append(row)
                if sink:
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
            pending = metrics if step <= cfg.steps else None
    finally:
        bar.close()
        if sink:
            sink.close()
    return history


def _check_finite(row: dict) -> None:
    if not np.isfinite(row["loss"]) or not np.isfinite(row["grad_norm"]):
        raise SpmdError(
            f"loss or gradients became NaN/inf at step {row['step']} "
            f"(loss={row['loss']}, grad_norm={row['grad_norm']}); lower --lr"
        )


def _summary(cfg: TrainConfig, history: list[dict], compile_s: float) -> dict:
    steady = history[2:] or history
    tokens_per_s = float(np.median([r["tokens_per_s"] for r in steady]))
    summary = {
        "steps": len(history),
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "tokens_per_s": tokens_per_s,
        "compile_s": compile_s,
    }
    _log(
        f"done: {summary['steps']} steps | loss {summary['first_loss']:.4f} -> "
        f"{summary['final_loss']:.4f} | {tokens_per_s:,.0f} tokens/s (median, steady state)"
        + (f" | metrics in {cfg.metrics_file}" if cfg.metrics_file else "")
    )
    return summary


def _ensure_parent(path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


def _log(msg: str) -> None:
    print(msg, flush=True)
