"""The chunked cross-entropy equals the plain one (values and gradients, on one device and on
a mesh), picks its chunks by size, and never holds a whole batch of float32 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmd
from spmd.errors import SpmdError
from spmd.models import get_model, loss


def plain_cross_entropy(x_btd, head_dv, targets_bt):
    """The textbook form: every logit at once, then log-softmax at the targets."""
    logits = jnp.einsum("btd,dv->btv", x_btd, head_dv)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets_bt[..., None], axis=-1))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 32, 64)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((64, 384)) * 0.1, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 384, (4, 32)), jnp.int32)
    return x, head, targets


@pytest.mark.parametrize("chunks", [1, 4, 16])
def test_chunked_loss_and_gradients_equal_the_plain_ones(inputs, chunks):
    grad = jax.value_and_grad(loss.cross_entropy, argnums=(0, 1))
    want = jax.value_and_grad(plain_cross_entropy, argnums=(0, 1))(*inputs)
    got = jax.jit(grad, static_argnums=3)(*inputs, chunks)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_chunks_must_divide_the_rows(inputs):
    with pytest.raises(SpmdError, match="loss_chunks=3 does not divide the 4x32=128 rows"):
        loss.cross_entropy(*inputs, chunks=3)


def test_auto_chunks_keep_one_chunk_of_logits_under_the_limit():
    assert loss.auto_chunks(16 * 128, 384) == 1  # 3 MB: no need to split
    assert loss.auto_chunks(16 * 2048, 32000) == 16  # 4.2 GB -> 16 chunks of 262 MB
    assert loss.auto_chunks(6, 10**9) == 2  # never more chunks than divide the rows


def _loss_and_grads(layout, chunks):
    model = get_model("gpt-tiny", {"n_layers": 1, "loss_chunks": chunks})
    params = layout.init_params(model.specs(), jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 384, (8, 33)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    fn = jax.jit(layout.traced(jax.value_and_grad(model.loss)))
    return jax.device_get(fn(params, batch))


def test_chunked_loss_on_a_mesh_matches_the_plain_loss_on_one_device():
    one = spmd.Layout.make("data=1", devices=jax.devices()[:1])
    want_loss, want_grads = _loss_and_grads(one, 1)
    got_loss, got_grads = _loss_and_grads(spmd.Layout.make("fsdp=4,tensor=2"), 4)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w)


def _temp_bytes(chunks: int) -> int:
    x = jax.ShapeDtypeStruct((8, 512, 64), jnp.float32)
    head = jax.ShapeDtypeStruct((64, 8192), jnp.float32)
    targets = jax.ShapeDtypeStruct((8, 512), jnp.int32)
    grad = jax.grad(lambda x, h, t: loss.cross_entropy(x, h, t, chunks), argnums=(0, 1))
    compiled = jax.jit(grad).lower(x, head, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunks_bound_the_live_logits():
    """4096 rows x 8192 vocab: 134 MB of float32 logits (and as much of one-hot and of their
    gradient) when whole; 16 chunks hold a sixteenth at a time."""
    logits = 4096 * 8192 * 4
    whole, chunked = _temp_bytes(1), _temp_bytes(16)
    assert whole >= logits
    assert chunked < logits / 4 and chunked < whole / 4
