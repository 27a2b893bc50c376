"""A Hugging Face Llama `config.json` <-> spmd's GPTConfig fields, checked field by field.

Only what the gpt model computes exactly is accepted: SwiGLU (`silu`), no biases, plain
rotary embeddings (no `rope_scaling`). Anything else is refused in one line naming the
field, rather than converted into a model that silently computes something different.
"""

from __future__ import annotations

import json
from pathlib import Path

from spmd.errors import SpmdError

ARCHITECTURE = "LlamaForCausalLM"
DTYPES = ("float32", "bfloat16", "float16")
# The spmd model a converted checkpoint names; every shape field is set by `overrides`.
BASE_MODEL = "gpt-tiny"


def read_config(hf_dir: str) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise SpmdError(f"--hf-dir {hf_dir} is not a folder")
    if not path.is_file():
        raise SpmdError(f"--hf-dir {hf_dir} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpmdError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise SpmdError(f"{path} is not a JSON object")
    return config


def rope_theta(config: dict) -> float:
    """transformers 5 nests it in `rope_parameters`; 4.x kept `rope_theta` at the top."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _check_supported(config: dict, where: str) -> None:
    archs = config.get("architectures") or [config.get("model_type")]
    if ARCHITECTURE not in archs:
        raise SpmdError(
            f"{where}: architectures={archs!r} is not supported; spmd converts {ARCHITECTURE}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise SpmdError(f"{where}: hidden_act={config['hidden_act']!r} is not supported (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise SpmdError(f"{where}: {flag}=true is not supported (the gpt model has no biases)")
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise SpmdError(
            f"{where}: rope scaling {scaling!r} is not supported (plain rotary embeddings only)"
        )


def to_overrides(config: dict, where: str = "config.json") -> dict:
    """GPTConfig fields for a Llama config: the shapes, rope theta, the norm's epsilon."""
    _check_supported(config, where)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")  # fmt: skip
    for name in required:
        if not isinstance(config.get(name), int):
            raise SpmdError(f"{where}: {name} is missing or not an integer")
    heads, width = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or width // heads
    return {
        "vocab_size": config["vocab_size"],
        "d_model": width,
        "n_layers": config["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "d_ff": config["intermediate_size"],
        "max_seq_len": int(config.get("max_position_embeddings", 2048)),
        "rope_theta": rope_theta(config),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def from_gpt(cfg, base: dict | None, dtype: str) -> dict:
    """A Llama config.json for a GPTConfig, on top of `base` (the converted checkpoint's
    original config, so that fields spmd does not model, like token ids, survive)."""
    config = dict(base or {})
    config.pop("rope_scaling", None)
    config.update(
        architectures=[ARCHITECTURE],
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta,  # what transformers 4.x reads
        dtype=dtype,
        torch_dtype=dtype,
    )
    return config


def source_dtype(config: dict) -> str:
    """The dtype the weights were published in (written back in it by default)."""
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"
