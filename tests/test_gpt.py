import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmd
from spmd import params as param_lib
from spmd.errors import SpmdError
from spmd.models import get_model, gpt, parse_overrides


@pytest.fixture(scope="module")
def tiny():
    model = get_model("gpt-tiny", {"n_layers": 2})
    return model, jax.jit(lambda k: param_lib.init_unsharded(model.specs(), k))(jax.random.key(0))


def test_presets_have_the_promised_sizes():
    sizes = {name: param_lib.count(get_model(name).specs()) for name in spmd.model_names()}
    assert 0.5e6 < sizes["gpt-tiny"] < 1.5e6
    assert 10e6 <= sizes["gpt-small"] <= 30e6
    assert 6.5e9 < sizes["llama-7b"] < 6.9e9  # Llama-2-7B: 6.74B
    assert 12.8e9 < sizes["llama-13b"] < 13.2e9  # 13.0B
    assert 68e9 < sizes["llama-70b"] < 70e9  # 69.0B
    assert get_model("llama-70b").cfg.n_kv_heads == 8


def test_forward_shapes_and_dtype(tiny):
    model, params = tiny
    tokens = jnp.zeros((2, 16), jnp.int32)
    logits = jax.jit(gpt.forward, static_argnums=2)(params, tokens, model.cfg)
    chex.assert_shape(logits, (2, 16, model.cfg.vocab_size))
    assert logits.dtype == jnp.float32


def test_attention_is_causal(tiny):
    model, params = tiny
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 16)).astype(np.int32)
    b = a.copy()
    b[0, 10:] = rng.integers(0, 256, 6)
    fwd = jax.jit(gpt.forward, static_argnums=2)
    la, lb = fwd(params, a, model.cfg), fwd(params, b, model.cfg)
    np.testing.assert_allclose(la[0, :10], lb[0, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[0, 10:], lb[0, 10:])


def test_initial_loss_is_near_uniform(tiny):
    model, params = tiny
    tokens = np.random.default_rng(0).integers(0, 256, (4, 33)).astype(np.int32)
    loss = jax.jit(model.loss)(params, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    assert abs(float(loss) - np.log(model.cfg.vocab_size)) < 0.1


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_numbers(tiny, remat):
    model, params = tiny
    tokens = np.random.default_rng(1).integers(0, 256, (2, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    base = jax.jit(jax.grad(model.loss))(params, batch)
    other = get_model("gpt-tiny", {"n_layers": 2, "remat": remat})
    chex.assert_trees_all_close(
        jax.jit(jax.grad(other.loss))(params, batch), base, rtol=1e-5, atol=1e-7
    )


def test_bfloat16_compute_keeps_fp32_params_and_logits(tiny):
    _, params = tiny
    model = get_model("gpt-tiny", {"n_layers": 2, "compute_dtype": "bfloat16"})
    tokens = np.random.default_rng(2).integers(0, 256, (2, 16)).astype(np.int32)
    fwd = jax.jit(gpt.forward, static_argnums=2)
    logits = fwd(params, tokens, model.cfg)
    assert logits.dtype == jnp.float32
    ref = fwd(params, tokens, get_model("gpt-tiny", {"n_layers": 2}).cfg)
    # bf16 has an 8-bit mantissa: close to fp32, but not equal.
    assert 0 < float(jnp.max(jnp.abs(logits - ref))) < 0.1


def test_overrides_are_typed_and_validated():
    assert get_model("gpt-tiny", parse_overrides("d_model=64,n_layers=1")).cfg.d_model == 64
    with pytest.raises(SpmdError, match="unknown model field 'width'"):
        get_model("gpt-tiny", {"width": "3"})
    with pytest.raises(SpmdError, match="not a valid int"):
        get_model("gpt-tiny", {"n_layers": "two"})
    with pytest.raises(SpmdError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        get_model("gpt-tiny", {"n_heads": 6})
    with pytest.raises(SpmdError, match="unknown model 'gpt-huge'"):
        get_model("gpt-huge")
