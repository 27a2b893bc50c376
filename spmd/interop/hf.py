"""Hugging Face Llama checkpoints in and out of spmd checkpoints.

In (`hf_to_spmd`): every parameter is made with `jax.make_array_from_callback` on its target
sharding; the callback reads only the block its device holds, layer by layer, from the
safetensors files. So besides the parameters on their devices, host memory holds one
device's block of one parameter at a time, and in a multi-process job each process reads
only its own devices' slices. The result is written by spmd's own Checkpointer as step 0:
an ordinary checkpoint that `spmd generate` reads and `spmd train --init-from` fine-tunes on
any mesh. Its optimizer state is a placeholder: a fine-tune starts a fresh one
(spmd.train.init_from).

Out (`spmd_to_hf`): each parameter is restored alone onto one device (or a mesh), gathered
one HF tensor at a time into safetensors shards of at most `max_shard_bytes`, and freed. So
host memory holds one shard and one parameter, never the whole model.

Every tensor's name and shape is checked against config.json before anything is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from spmd.checkpoint.faults import first_line
from spmd.checkpoint.steps import pick_step
from spmd.errors import SpmdError
from spmd.interop import hf_config
from spmd.interop.hf_names import IGNORED_SUFFIXES, TensorMap, tensor_maps
from spmd.interop.safetensors_io import Reader, ShardedWriter, safetensors
from spmd.layout import Layout
from spmd.models import Model, get_model

TOKENIZER = "tokenizer.json"
# Small files that transformers reads beside the weights; carried across both ways as they are.
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _put(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def check_tensors(reader: Reader, model: Model, maps: list[TensorMap], where: str) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is."""
    cfg, specs = model.cfg, model.specs()
    expected = {}
    for m in maps:
        shape = _at(specs, m.path).shape[1 if m.layered else 0 :]
        for name in m.hf_names(cfg.n_layers):
            expected[name] = m.hf_shape(shape)
    present = set(reader.names())
    for name, shape in expected.items():
        if name not in present:
            raise SpmdError(f"{where}: tensor {name} is missing (config.json implies it)")
        found = reader.shape(name)
        if found != shape:
            raise SpmdError(
                f"{where}: tensor {name} has shape {list(found)} but config.json implies "
                f"{list(shape)}"
            )
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(
        n for n in present - set(expected) - tied_head if not n.endswith(IGNORED_SUFFIXES)
    )
    if extra:
        raise SpmdError(f"{where}: tensor {extra[0]} is not part of a Llama model spmd knows")


def _make_param(reader: Reader, m: TensorMap, spec, sharding):
    """One parameter on its sharding, each device's block read straight from the files."""
    per_layer = spec.shape[1:] if m.layered else spec.shape
    names = m.hf_names(spec.shape[0]) if m.layered else None

    def block(index):
        if not m.layered:
            return reader.read(m.hf, lambda t: m.read(t, per_layer, index)).astype(
                spec.dtype, copy=False
            )
        layers = range(*index[0].indices(spec.shape[0]))
        out = None  # filled layer by layer: the block is never held twice
        for j, i in enumerate(layers):
            part = reader.read(names[i], lambda t: m.read(t, per_layer, index[1:]))
            if out is None:
                out = np.empty((len(layers), *part.shape), spec.dtype)
            out[j] = part
        return out

    return jax.make_array_from_callback(spec.shape, sharding, block)


def load_hf_params(hf_dir: str, layout: Layout) -> tuple[Model, dict, dict]:
    """(model, params on `layout`, the HF config) from a Llama checkpoint folder."""
    config = hf_config.read_config(hf_dir)
    where = str(Path(hf_dir) / "config.json")
    model = get_model(hf_config.BASE_MODEL, hf_config.to_overrides(config, where))
    maps = tensor_maps(model.cfg.tie_embeddings)
    specs, shardings = model.specs(), layout.param_shardings(model.specs())
    params: dict = {}
    with Reader(hf_dir) as reader:
        check_tensors(reader, model, maps, hf_dir)
        for m in maps:
            value = _make_param(reader, m, _at(specs, m.path), _at(shardings, m.path))
            _put(params, m.path, value)
    return model, params, config


def hf_to_spmd(hf_dir: str, out: str, layout: Layout) -> dict:
    """Convert; returns a summary (parameters, the tokenizer if one came along)."""
    from spmd import checkpoint as ckpt
    from spmd.train.config import TrainConfig
    from spmd.train.state import TrainState

    if ckpt.all_steps(out):
        raise SpmdError(f"--out {out} already holds a checkpoint; choose a new folder")
    safetensors()  # before anything is created
    model, params, config = load_hf_params(hf_dir, layout)
    Path(out).mkdir(parents=True, exist_ok=True)
    tokenizer = None
    if (Path(hf_dir) / TOKENIZER).is_file():
        tokenizer = str((Path(out) / TOKENIZER).absolute())
        shutil.copyfile(Path(hf_dir) / TOKENIZER, tokenizer)
    _copy_companions(Path(hf_dir), Path(out))
    overrides = tuple(hf_config.to_overrides(config).items())
    run = TrainConfig(model=hf_config.BASE_MODEL, overrides=overrides, tokenizer=tokenizer)
    record = {
        **run.to_json(),
        **layout.to_json(),
        "hf_config": config,
        "converted_from": str(Path(hf_dir).absolute()),
    }
    # orbax refuses an empty item; a fine-tune makes its own optimizer state (init_from).
    no_optimizer = {"not_started": jax.numpy.zeros((), jax.numpy.int32)}
    state = TrainState(step=no_optimizer["not_started"], params=params, opt_state=no_optimizer)
    saver = ckpt.Checkpointer(out, every=1, keep=1, async_save=False)
    try:
        saver.save(0, state, {"mesh": layout.spec}, record)
    finally:
        saver.close()
    return {"params": model.n_params, "tokenizer": tokenizer, "cfg": model.cfg}


def spmd_to_hf(
    ckpt_dir: str,
    out: str,
    layout: Layout,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> dict:
    """Write a checkpoint's parameters as a Llama safetensors folder; returns a summary."""
    from spmd import checkpoint as ckpt
    from spmd.models import gpt

    run = ckpt.load_run_config(ckpt_dir, step)
    model = get_model(run["model"], dict(run.get("overrides") or {}))
    if not isinstance(model.cfg, gpt.GPTConfig):
        raise SpmdError(f"--ckpt {ckpt_dir}: model {run['model']!r} has no Llama form")
    base = hf_base_config(run)
    dtype = dtype or hf_config.source_dtype(base or {})
    if dtype not in NUMPY_DTYPES:
        raise SpmdError(f"--dtype {dtype} must be one of {', '.join(NUMPY_DTYPES)}")
    safetensors()
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise SpmdError(f"--out {out} is not empty; choose a new folder")
    step = pick_step(ckpt_dir, step)
    target = layout.abstract_params(model.specs())
    out_path.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out_path, max_shard_bytes)
    np_dtype = NUMPY_DTYPES[dtype]
    for m in tensor_maps(model.cfg.tie_embeddings):
        value = _restore_one(ckpt_dir, step, m.path, _at(target, m.path))
        if m.layered:
            for i, name in enumerate(m.hf_names(model.cfg.n_layers)):
                writer.add(name, m.to_hf(np.asarray(value[i])).astype(np_dtype))
        else:
            writer.add(m.hf, m.to_hf(np.asarray(value)).astype(np_dtype))
        value.delete()  # on a CPU the devices' memory is the host's
    files = writer.close()
    config = hf_config.from_gpt(model.cfg, base, dtype)
    (out_path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = run.get("tokenizer")
    if tokenizer and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out_path / TOKENIZER)
        _copy_companions(Path(tokenizer).parent, out_path)
    return {"files": files, "params": model.n_params, "dtype": dtype}


def _restore_one(ckpt_dir: str, step: int, path, abstract):
    """One parameter, read alone: the whole model is never restored at once."""
    from spmd.checkpoint.restore import restore_items

    tree: dict = {}
    _put(tree, path, abstract)
    try:
        return _at(restore_items(ckpt_dir, step, partial=True, params=tree)["params"], path)
    except Exception as e:  # orbax and tensorstore raise many kinds for a bad step
        raise SpmdError(
            f"--ckpt {ckpt_dir} step {step}: cannot read {'/'.join(path)} ({first_line(e)})"
        ) from None


def _copy_companions(source: Path, target: Path) -> None:
    for name in COMPANIONS:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def hf_base_config(run: dict) -> dict | None:
    """The original config.json of a converted checkpoint, or of the one a fine-tune
    started from (`init_from`), if it is still there."""
    if run.get("hf_config"):
        return run["hf_config"]
    source = run.get("init_from")
    if not source:
        return None
    from spmd import checkpoint as ckpt

    try:
        return ckpt.load_run_config(source).get("hf_config")
    except SpmdError:
        return None
