"""Context parallelism: ring and allgather attention over a `sequence` mesh axis equal the
einsum reference, and a model on a sequence mesh has the single-device losses and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmd
from spmd.errors import SpmdError
from spmd.models import attention, get_model
from spmd.parallel import ring_attention

MODES = list(ring_attention.MODES)
# 256 tokens over sequence=4 is 8 chunks of 32: every chunk pair of the zig-zag is exercised.
SEQ, BATCH = 256, 4
TINY = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
        "d_ff": 128, "max_seq_len": SEQ}  # fmt: skip
MESHES = ["sequence=4", "sequence=4,fsdp=2", "sequence=2,tensor=2,data=2"]


def layout_for(mesh: str) -> spmd.Layout:
    n = int(np.prod([int(part.split("=")[1]) for part in mesh.split(",")]))
    return spmd.Layout.make(mesh, devices=jax.devices()[:n])


def test_zigzag_order_gives_each_shard_a_head_and_a_tail_chunk():
    order = ring_attention.zigzag_order(16, 4)  # 8 chunks of 2
    shards = order.reshape(4, 4)
    np.testing.assert_array_equal(shards[0], [0, 1, 14, 15])
    np.testing.assert_array_equal(shards[3], [6, 7, 8, 9])
    assert sorted(order) == list(range(16))
    with pytest.raises(SpmdError, match=r"seq=12 is not divisible by 2\*sequence=8"):
        ring_attention.zigzag_order(12, 4)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    b, t, h, g, k = 2, SEQ, 8, 2, 16
    q = jnp.asarray(rng.standard_normal((b, t, h, k)), jnp.float32)
    kv = [jnp.asarray(rng.standard_normal((b, t, g, k)), jnp.float32) for _ in range(2)]
    return q, *kv


def reference(q, k, v):
    return attention.attend(q, k, v, attention.causal_mask(q.shape[1]))


def in_sequence_order(mode):
    """Ring attention as a function of sequence-ordered q, k, v: permuted in, un-permuted out."""

    def fn(q, k, v):
        order = ring_attention.context_order(q.shape[1])
        out = ring_attention.attention(q[:, order], k[:, order], v[:, order], mode)
        return out[:, np.argsort(order)]

    return fn


# sequence=2,tensor=4: 8 query heads split 4 ways over 2 replicated KV heads.
@pytest.mark.parametrize("mesh", ["sequence=4", "sequence=2,tensor=4"])
@pytest.mark.parametrize("mode", MODES)
def test_context_parallel_attention_matches_the_einsum_reference(qkv, mesh, mode):
    layout = layout_for(mesh)
    fn = in_sequence_order(mode)
    got = jax.jit(layout.traced(fn))(*qkv)
    np.testing.assert_allclose(got, reference(*qkv), rtol=1e-5, atol=1e-5)

    def loss(f, *args):
        return jnp.sum(jnp.sin(f(*args)))

    grads = jax.jit(layout.traced(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))))(*qkv)
    want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(*qkv)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def loss_and_grads(mesh: str, mode: str = "ring"):
    layout = layout_for(mesh)
    model = get_model("gpt-tiny", {**TINY, "context_parallel": mode})
    params = layout.init_params(model.specs(), jax.random.key(0))
    tokens = np.random.default_rng(1).integers(0, 384, (BATCH, SEQ + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    batch = {k: jax.device_put(v, layout.sharding(("batch", "length"), v.shape))
             for k, v in batch.items()}  # fmt: skip
    loss, grads = jax.jit(layout.traced(jax.value_and_grad(model.loss)))(params, batch)
    return float(loss), jax.device_get(grads)


@functools.cache
def single_device():
    return loss_and_grads("data=1")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mesh", MESHES)
def test_sequence_mesh_matches_one_device_losses_and_gradients(mesh, mode):
    want_loss, want = single_device()
    got_loss, got = loss_and_grads(mesh, mode)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for path, g, w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got), jax.tree.leaves(want),
        strict=True,
    ):  # fmt: skip
        rel = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert rel < 1e-5, f"{jax.tree_util.keystr(path[0])}: relative difference {rel:.2e}"


def test_forward_logits_come_back_in_sequence_order():
    layout = layout_for("sequence=4")
    model = get_model("gpt-tiny", TINY)
    params = layout.init_params(model.specs(), jax.random.key(0))
    tokens = np.random.default_rng(2).integers(0, 384, (2, SEQ)).astype(np.int32)
    from spmd.models import gpt

    got = jax.jit(layout.traced(functools.partial(gpt.forward, cfg=model.cfg)))(params, tokens)
    want = jax.jit(functools.partial(gpt.forward, cfg=model.cfg))(jax.device_get(params), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
