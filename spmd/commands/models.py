"""`spmd models`: list the model presets and their sizes."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("models", help="list the model presets")


def run(args) -> int:
    from spmd.models import get_model, model_names

    for name in model_names():
        model = get_model(name)
        print(f"{name:10s} {model.n_params / 1e6:10.1f}M  {model.cfg}")
    return 0
