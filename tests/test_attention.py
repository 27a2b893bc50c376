"""Every attention implementation that runs on CPU equals the einsum reference (GQA, causal),
forward and backward, and trains the same on a mesh as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmd
from spmd.errors import SpmdError
from spmd.models import attention, get_model

CPU_IMPLEMENTATIONS = ["einsum", "xla", "blocked"]


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    b, t, h, g, k = 2, 256, 8, 2, 16
    q = jnp.asarray(rng.standard_normal((b, t, h, k)), jnp.float32)
    kv = [jnp.asarray(rng.standard_normal((b, t, g, k)), jnp.float32) for _ in range(2)]
    return q, *kv


def reference(q, k, v):
    """Softmax over the causal scores, written out, with KV heads repeated for GQA."""
    r = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_implementation_matches_the_reference_forward_and_backward(qkv, impl):
    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args)))

    got = jax.jit(lambda *a: attention.causal_attention(*a, impl))(*qkv)
    np.testing.assert_allclose(got, reference(*qkv), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *a: loss(lambda *x: attention.causal_attention(*x, impl), *a),
                     argnums=(0, 1, 2))(*qkv)  # fmt: skip
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(*qkv)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_blocked_form_handles_a_block_that_does_not_divide_the_length(qkv):
    q, k, v = (x[:, :96] for x in qkv)
    got = attention.blocked(q, k, v, block=64)  # gcd(64, 96) = 32 keys per block
    np.testing.assert_allclose(got, reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_auto_resolves_per_backend_and_bad_names_are_refused():
    assert attention.resolve("auto") == attention.CPU_DEFAULT  # this suite runs on CPU
    assert attention.resolve("xla") == "xla"
    with pytest.raises(SpmdError, match="attention='flash' must be one of"):
        attention.resolve("flash")
    with pytest.raises(SpmdError, match="attention='flash'"):
        get_model("gpt-tiny", {"attention": "flash"})


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_each_implementation_trains_alike_on_a_mesh_and_on_one_device(impl):
    def losses(layout):
        model = get_model("gpt-tiny", {"n_layers": 2, "attention": impl})
        params = layout.init_params(model.specs(), jax.random.key(0))
        tokens = np.random.default_rng(1).integers(0, 384, (8, 33)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        loss, grads = jax.jit(layout.traced(jax.value_and_grad(model.loss)))(params, batch)
        return float(loss), jax.device_get(grads)

    want_loss, want = losses(spmd.Layout.make("data=1", devices=jax.devices()[:1]))
    got_loss, got = losses(spmd.Layout.make("data=2,fsdp=2,tensor=2"))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w)


def test_cudnn_off_a_gpu_is_one_clear_error(qkv, capsys):
    from spmd.cli import main

    with pytest.raises(SpmdError, match="attention=cudnn runs on NVIDIA GPUs only"):
        attention.causal_attention(*qkv, "cudnn")
    argv = ["explain", "--model", "gpt-tiny", "--set", "n_layers=1", "--attention", "cudnn"]
    assert main([*argv, "--mesh", "data=8", "--seq", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention=cudnn runs on NVIDIA GPUs only" in err[0], err
