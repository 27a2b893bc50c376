"""`spmd train --init-from CKPT`: a new run that starts from another checkpoint's weights.

This is how a converted Hugging Face checkpoint (or any spmd checkpoint) is fine-tuned: the
run takes the model (its preset and `--set` fields) and the tokenizer from the checkpoint's
config, restores only the parameters straight onto the run's own mesh, and starts a fresh
optimizer state, schedule, step count and data order in its own `--ckpt-dir`. The source
folder is only read, so several fine-tunes can start from one base. Resuming the fine-tune
is an ordinary `--resume` with the same flags (`--init-from` included).
"""

from __future__ import annotations

import dataclasses

from spmd.errors import SpmdError
from spmd.train.config import TrainConfig

# Fields that fix the parameters' shapes: a fine-tune cannot change them.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "tie_embeddings")  # fmt: skip
DEFAULT_MODEL = TrainConfig().model


def resolve(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the model, its fields and the tokenizer of `--init-from`'s checkpoint;
    the run's own `--set` fields apply on top (remat, dtype, ...), shapes excepted."""
    if not cfg.init_from:
        _refuse_resuming_a_conversion(cfg)
        return cfg
    from spmd import checkpoint as ckpt
    from spmd.data.tokenizer import checkpoint_tokenizer

    source = ckpt.load_run_config(cfg.init_from)
    name = source["model"]
    if cfg.model not in (DEFAULT_MODEL, name):
        raise SpmdError(
            f"--model {cfg.model} contradicts --init-from {cfg.init_from}, whose model is "
            f"{name}; drop --model"
        )
    base = {str(k): str(v) for k, v in source.get("overrides") or []}
    mine = {str(k): str(v) for k, v in cfg.overrides}
    for key in SHAPE_FIELDS:
        if key in mine and key in base and mine[key] != base[key]:
            raise SpmdError(
                f"--set {key}={mine[key]} changes the shape of the weights of --init-from "
                f"{cfg.init_from} ({key}={base[key]})"
            )
    return dataclasses.replace(
        cfg,
        model=name,
        overrides=tuple({**base, **mine}.items()),
        tokenizer=cfg.tokenizer or checkpoint_tokenizer(source.get("tokenizer"), cfg.init_from),
    )


def start_state(program, ckpt_dir: str):
    """Step 0 of the fine-tune: the checkpoint's parameters on the program's layout, and a
    fresh optimizer state sharded like them."""
    import jax
    import jax.numpy as jnp

    from spmd import checkpoint as ckpt
    from spmd.train.state import TrainState

    shardings = program.state_shardings
    params = ckpt.restore_params(ckpt_dir, program.model, program.layout)
    opt_state = jax.jit(program.tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def _refuse_resuming_a_conversion(cfg: TrainConfig) -> None:
    """A converted checkpoint is weights only (no optimizer state, data position or run
    settings), and a fine-tune writing into its folder would in time delete the base weights
    (`--keep`): so `--resume` on it points to `--init-from` instead."""
    from spmd import checkpoint as ckpt

    if not (cfg.resume and cfg.ckpt_dir and ckpt.latest_valid_step(cfg.ckpt_dir) is not None):
        return
    source = ckpt.load_run_config(cfg.ckpt_dir).get("converted_from")
    if source:
        raise SpmdError(
            f"--resume: {cfg.ckpt_dir} holds weights converted from {source}, not a run to "
            f"continue; fine-tune them with --init-from {cfg.ckpt_dir} --ckpt-dir NEW_DIR"
        )
