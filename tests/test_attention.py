"""Every attention implementation that runs on CPU equals the einsum reference (GQA, causal),
forward and backward, and trains the same on a mesh as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmd
from spmd.errors import SpmdError
from spmd.models import attention, get_model

# splash runs JAX's Pallas TPU kernel in interpret mode here: the same kernel, slowly.
CPU_IMPLEMENTATIONS = ["einsum", "xla", "blocked", "splash"]


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


@pytest.mark.parametrize("impl", ["xla", "blocked", "splash"])
def test_each_implementation_trains_alike_on_a_mesh_and_on_one_device(impl):
    seq = 128 if impl == "splash" else 32  # the splash kernel's blocks are multiples of 128

    def losses(layout):
        model = get_model("gpt-tiny", {"n_layers": 2, "attention": impl})
        params = layout.init_params(model.specs(), jax.random.key(0))
        tokens = np.random.default_rng(1).integers(0, 384, (8, seq + 1)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        loss, grads = jax.jit(layout.traced(jax.value_and_grad(model.loss)))(params, batch)
        return float(loss), jax.device_get(grads)

    want_loss, want = losses(spmd.Layout.make("data=1", devices=jax.devices()[:1]))
    got_loss, got = losses(spmd.Layout.make("data=2,fsdp=2,tensor=2"))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w)


def test_splash_under_a_mesh_that_replicates_the_kv_heads(qkv):
    """tensor=4 over 2 KV heads: KV replicated, each device's 2 query heads cut a group."""
    layout = spmd.Layout.make("data=2,tensor=4")
    splash = layout.traced(lambda *a: attention.causal_attention(*a, "splash"))
    np.testing.assert_allclose(jax.jit(splash)(*qkv), reference(*qkv), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(splash(*a))), argnums=(1, 2)))(*qkv)
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a))), argnums=(1, 2))(*qkv)
    for g, w in zip(grads, want, strict=True):  # the replicated KV heads' gradients summed
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_splash_keeps_a_bfloat16_q_in_bfloat16(qkv):
    q, k, v = (x[:, :128].astype(jnp.bfloat16) for x in qkv)
    got = attention.causal_attention(q, k, v, "splash")
    assert got.dtype == jnp.bfloat16
    want = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2)  # bf16 rounding


def test_auto_is_splash_on_a_tpu_except_inside_the_pipelines_shard_map(monkeypatch):
    monkeypatch.setattr(attention, "_platform", lambda: "tpu")
    assert attention.resolve("auto") == "splash"
    inside = []
    mesh = jax.make_mesh((8,), ("stage",), devices=jax.devices())
    body = lambda x: inside.append(attention.resolve("auto")) or x  # noqa: E731
    jax.shard_map(body, mesh=mesh, in_specs=jax.P(), out_specs=jax.P())(jnp.zeros(8))
    assert inside == [attention.CPU_DEFAULT]


def test_splash_refuses_what_it_cannot_run_in_one_line(qkv, capsys):
    from spmd.cli import main

    with pytest.raises(SpmdError, match="attention=splash needs seq divisible by 128; seq=96"):
        attention.causal_attention(*(x[:, :96] for x in qkv), "splash")
    argv = ["explain", "--model", "gpt-tiny", "--set", "n_layers=2", "--attention", "splash"]
    for mesh, seq, message in (
        ("data=8", "96", "seq=96 is not"),
        ("stage=2,data=4", "128", "stage=2 and attention=splash together are not supported"),
    ):
        assert main([*argv, "--mesh", mesh, "--seq", seq]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_cudnn_off_a_gpu_is_one_clear_error(qkv, capsys):
    from spmd.cli import main

    with pytest.raises(SpmdError, match="attention=cudnn runs on NVIDIA GPUs only"):
        attention.causal_attention(*qkv, "cudnn")
    argv = ["explain", "--model", "gpt-tiny", "--set", "n_layers=1", "--attention", "cudnn"]
    assert main([*argv, "--mesh", "data=8", "--seq", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention=cudnn runs on NVIDIA GPUs only" in err[0], err
