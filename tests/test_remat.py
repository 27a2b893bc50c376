"""Remat policies change what the backward pass keeps, never what it computes."""

import jax
import numpy as np
import pytest

import spmd
from spmd.models import get_model, gpt


def _loss_grads_and_temp_bytes(remat: str):
    model = get_model("gpt-tiny", {"n_layers": 2, "remat": remat})
    layout = spmd.Layout.make("data=1", devices=jax.devices()[:1])
    params = layout.init_params(model.specs(), jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 384, (8, 129)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    fn = jax.jit(jax.value_and_grad(model.loss))
    temp = fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    loss, grads = fn(params, batch)
    return float(loss), jax.device_get(grads), temp


@pytest.fixture(scope="module")
def results():
    return {policy: _loss_grads_and_temp_bytes(policy) for policy in gpt.REMAT_POLICIES}


@pytest.mark.parametrize("policy", [p for p in gpt.REMAT_POLICIES if p != "none"])
def test_every_policy_computes_what_no_remat_computes(results, policy):
    want_loss, want, _ = results["none"]
    loss, grads, _ = results[policy]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_the_attention_policy_keeps_less_than_none_and_more_than_full(results):
    """It keeps q, k, v and the attention output of each layer, and drops the rest."""
    temp = {policy: r[2] for policy, r in results.items()}
    assert temp["full"] < temp["attention"] < temp["none"], temp
