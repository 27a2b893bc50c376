"""`spmd models`: list the model presets and their sizes."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("models", help="list the model presets")


def run(args) -> int:
    from spmd.compiler.cost import matmul_params
    from spmd.models import get_model, model_names

    for name in model_names():
        model = get_model(name)
        # The matmul weights one token goes through (MoE: only its top_k experts): what the
        # FLOPs convention (spmd.compiler.cost) counts.
        active = matmul_params(model.cfg)
        size = f"{model.n_params / 1e6:10.1f}M  active matmul {active / 1e6:7.1f}M"
        print(f"{name:10s} {size}  {model.cfg}")
    return 0
