"""The PyTorch eager baseline of `make bench` is the same model as spmd's: on spmd's initial
weights its loss matches spmd's, and its step trains."""

import jax
import numpy as np
import pytest

from spmd.models import get_model, parse_overrides

torch = pytest.importorskip("torch")

from experiments.baselines import torch_eager  # noqa: E402

# GQA (4 query heads over 2 KV heads) so the grouped path is compared too.
TINY = "n_layers=2,d_model=32,n_heads=4,n_kv_heads=2,head_dim=8,d_ff=64"


def _tokens(vocab, b=2, t=16):
    tokens = np.random.default_rng(0).integers(0, vocab, (b, t + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def test_torch_model_on_spmd_weights_has_spmd_loss():
    model = get_model("gpt-tiny", parse_overrides(TINY))
    params = model.init(jax.random.key(0))
    inputs, targets = _tokens(model.cfg.vocab_size)
    want = float(model.loss(params, {"inputs": inputs, "targets": targets}))
    net, prepare, _ = torch_eager.make_step(model.cfg)
    torch_eager.load_spmd_params(net, params)
    with torch.no_grad():
        got = float(net.loss(*prepare(inputs, targets)))
    assert got == pytest.approx(want, abs=1e-4)


def test_torch_step_trains():
    cfg = get_model("gpt-tiny", parse_overrides(TINY)).cfg
    _, prepare, step = torch_eager.make_step(cfg)
    batch = prepare(*_tokens(cfg.vocab_size))
    losses = [float(step(*batch)) for _ in range(3)]
    assert losses[-1] < losses[0]
