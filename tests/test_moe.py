"""Mixture-of-experts: routing, the router losses, dropless and capacity experts against a
per-token reference, expert parallelism against one device, FLOPs, explain and generate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmd
from spmd.compiler import cost, report
from spmd.compiler.program import TrainProgram
from spmd.inference import decode
from spmd.models import experts, get_model, gpt, moe
from spmd.train import optim

BATCH, SEQ, STEPS = 16, 32, 3
EP_MESHES = ["expert=4,data=2", "expert=2,fsdp=2,tensor=2"]
OPTIM = optim.OptimConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS, eps=1e-6)  # see test_parity


def weights(key, e=4, d=8, f=16):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "we_gate": jax.random.normal(k1, (e, d, f)) / d**0.5,
        "we_up": jax.random.normal(k2, (e, d, f)) / d**0.5,
        "we_down": jax.random.normal(k3, (e, f, d)) / f**0.5,
    }


def per_token_reference(x_nd, expert_nk, gate_nk, w):
    """sum over a token's choices of gate * SwiGLU through that expert, one token at a time."""
    x_nd, w = np.asarray(x_nd, np.float64), {k: np.asarray(v, np.float64) for k, v in w.items()}
    out = np.zeros_like(x_nd)
    for i, (ids, gates) in enumerate(zip(np.asarray(expert_nk), np.asarray(gate_nk), strict=True)):
        for e, g in zip(ids, gates, strict=True):
            if e >= w["we_gate"].shape[0]:
                continue  # dropped
            gate = x_nd[i] @ w["we_gate"][e]
            h = gate / (1 + np.exp(-gate)) * (x_nd[i] @ w["we_up"][e])
            out[i] += g * (h @ w["we_down"][e])
    return out


def test_routing_picks_the_top_k_with_softmax_gates_and_the_switch_losses():
    x = jnp.eye(4)  # token i's logits are row i of the router
    logits = np.array([[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 5], [1, 0, 4, 0]], np.float32)
    ids, gates, stats = experts.route(x, jnp.asarray(logits), top_k=2)
    np.testing.assert_array_equal(ids, [[0, 1], [1, 2], [3, 0], [2, 0]])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.take_along_axis(probs, np.asarray(ids), -1)
    np.testing.assert_allclose(gates, top / top.sum(-1, keepdims=True), rtol=1e-6)
    load = np.array([3, 2, 2, 1]) / 8  # fraction of the 8 assignments per expert
    np.testing.assert_allclose(stats["load"], load)
    np.testing.assert_allclose(stats["aux_loss"], 4 * np.sum(load * probs.mean(0)), rtol=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(stats["z_loss"], np.mean(lse**2), rtol=1e-6)
    _, gates1, _ = experts.route(x, jnp.asarray(logits), top_k=1)  # Switch: the raw probability
    np.testing.assert_allclose(gates1[:, 0], probs.max(-1), rtol=1e-6)


def test_balanced_routing_has_aux_loss_one():
    x = jnp.eye(4)
    _, _, stats = experts.route(x, 5 * jnp.eye(4), top_k=1)
    assert stats["aux_loss"] == pytest.approx(1.0, rel=1e-6)  # f_e = 1/E; sum_e P_e = 1


def test_dropless_experts_match_a_per_token_reference():
    x = jax.random.normal(jax.random.key(1), (24, 8))
    w = weights(jax.random.key(2))
    ids, gates, _ = jax.jit(experts.route, static_argnums=2)(
        x, jax.random.normal(jax.random.key(3), (8, 4)), 2
    )
    got = jax.jit(experts.moe_ffn, static_argnums=4)(x, ids, gates, w, jnp.float32)
    np.testing.assert_allclose(got, per_token_reference(x, ids, gates, w), atol=1e-5, rtol=1e-5)


def test_capacity_mode_drops_the_latest_tokens_and_counts_them():
    x = jax.random.normal(jax.random.key(1), (16, 8))
    router = jnp.zeros((8, 4)).at[:, 0].set(100.0)  # every token's first choice is expert 0
    cap = experts.capacity(16, top_k=1, n_experts=4, factor=1.0)
    assert cap == 4
    ids, gates, stats = jax.jit(experts.route, static_argnums=(2, 3))(x * 0 + 1, router, 1, cap)
    np.testing.assert_array_equal(ids[:, 0], [0] * 4 + [4] * 12)  # 4 = dropped (sentinel E)
    assert float(stats["dropped"]) == pytest.approx(12 / 16)
    w = weights(jax.random.key(2))
    got = jax.jit(experts.moe_ffn, static_argnums=(4, 5))(x, ids, gates, w, jnp.float32, cap)
    np.testing.assert_allclose(got, per_token_reference(x, ids, gates, w), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got)[4:] == 0)  # dropped tokens pass only through the residual


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5], ids=["dropless", "capacity"])
def test_expert_parallel_dispatch_matches_one_device(capacity_factor):
    """all_to_all over `expert`, buffers and all: the same outputs and drops on any mesh."""
    n, e = 64, 8
    x = jax.random.normal(jax.random.key(1), (n, 16))
    w = weights(jax.random.key(2), e=e, d=16)
    router = jax.random.normal(jax.random.key(3), (16, e))
    cap = experts.capacity(n, 2, e, capacity_factor)

    def fn(x, router, w):
        ids, gates, stats = experts.route(x, router, 2, cap)
        return experts.moe_ffn(x, ids, gates, w, jnp.float32, cap), stats

    want = jax.jit(fn)(x, router, w)
    layout = spmd.Layout.make("expert=4,data=2")
    w_sh = {k: layout.sharding(("experts", "embed", "mlp"), v.shape) for k, v in w.items()}
    got = jax.jit(layout.traced(fn))(
        jax.device_put(x, layout.sharding((("batch", "length"), None))), router,
        jax.device_put(w, w_sh),
    )  # fmt: skip
    np.testing.assert_allclose(got[0], want[0], atol=1e-6, rtol=1e-5)
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-6)
    if capacity_factor:
        assert float(got[1]["dropped"]) > 0.1


def fixed_batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (STEPS, BATCH, SEQ + 1)).astype(np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def put(batch, layout, model):
    sh = layout.batch_shardings(model.batch_axes, {k: v.shape for k, v in batch.items()})
    return {k: jax.device_put(v, sh[k]) for k, v in batch.items()}


@functools.cache
def loss_and_grads(mesh_spec: str):
    """moe-tiny's objective, metrics and gradients on the first batch, at the init."""
    n = 1 if mesh_spec == "data=1" else 8
    layout = spmd.Layout.make(mesh_spec, devices=jax.devices()[:n])
    model = get_model("moe-tiny")
    params = layout.init_params(model.specs(), jax.random.key(0))
    fn = jax.jit(layout.traced(jax.value_and_grad(model.loss_and_metrics, has_aux=True)))
    return jax.device_get(fn(params, put(fixed_batches()[0], layout, model)))


def relative(a, b):
    return np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)


@pytest.mark.slow
# The sequence mesh checks that MoE runs in context parallelism's zig-zag order, as gpt does.
@pytest.mark.parametrize("mesh_spec", [*EP_MESHES, "sequence=2,expert=2,data=2"])
def test_moe_tiny_losses_and_gradients_match_one_device(mesh_spec):
    (loss, metrics), grads = loss_and_grads(mesh_spec)
    (want_loss, want_metrics), want_grads = loss_and_grads("data=1")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=0)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)
    for path, g in jax.tree_util.tree_leaves_with_path(want_grads):
        got = functools.reduce(lambda t, p: t[p.key], path, grads)
        assert relative(got, g) < 1e-5, jax.tree_util.keystr(path)
    assert np.linalg.norm(grads["layers"]["moe"]["router"]) > 0  # the gates carry gradient


def train(mesh_spec: str):
    n = 1 if mesh_spec == "data=1" else 8
    layout = spmd.Layout.make(mesh_spec, devices=jax.devices()[:n])
    model = get_model("moe-tiny")
    program = TrainProgram.for_tokens(model, layout, BATCH, SEQ, optimizer=OPTIM)
    step, state = program.compile(), program.init_state(jax.random.key(0))
    rows = []
    for batch in fixed_batches():
        state, metrics = step(state, put(batch, layout, model))
        rows.append(jax.device_get(metrics))
    return step, rows, jax.device_get(state.params)


@pytest.mark.slow
def test_training_on_expert_parallel_matches_one_device_and_explain_shows_the_all_to_alls():
    step, rows, params = train("expert=4,data=2")
    _, want_rows, want_params = train("data=1")
    for k in ("loss", "moe_aux_loss", "moe_z_loss", "moe_load"):
        np.testing.assert_allclose([r[k] for r in rows], [r[k] for r in want_rows], rtol=1e-5)
    assert want_rows[-1]["loss"] < want_rows[0]["loss"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        assert relative(a, b) < 1e-5
    # The compiler report of this very program lists the dispatch and combine all-to-alls.
    rep = report.make_report(
        step.program, cost.get_hardware("cpu"), report.stats_from_compiled(step)
    )
    a2a = [c for c in rep.stats.collectives if c.kind == "all-to-all"]
    assert a2a and all(c.axes == ("expert",) for c in a2a)
    # Forward: 3 per MoE layer (rows, expert ids, results); the backward adds 2 more.
    assert sum(c.count for c in a2a) >= 3 * get_model("moe-tiny").cfg.n_moe_layers


def test_flops_count_active_parameters_by_hand():
    cfg = get_model("moe-tiny", {"shared_experts": "1"}).cfg
    d, v = 64, 384
    attention = 2 * d * 4 * 16 + 2 * d * 2 * 16  # wq, wo; wk, wv with 2 kv heads
    dense_mlp = 3 * d * 128
    moe_mlp = d * 8 + (2 + 1) * 3 * d * 64  # router, top-2 experts and the shared one
    n_matmul = 4 * attention + 2 * dense_mlp + 2 * moe_mlp + d * v
    assert cost.matmul_params(cfg) == n_matmul
    model = get_model("moe-tiny", {"shared_experts": "1"})
    attn_flops = 12 * 4 * 4 * 16 * (SEQ / 2)
    want = BATCH * SEQ * (6 * n_matmul + attn_flops)
    assert cost.model_flops_per_step(model, BATCH, SEQ) == pytest.approx(want, rel=1e-12)


def test_moe_small_is_gpt_small_in_active_parameters():
    small, dense = get_model("moe-small").cfg, get_model("gpt-small").cfg
    extra = cost.matmul_params(small) - cost.matmul_params(dense)
    assert extra == small.n_layers * small.d_model * small.n_experts  # only the routers


def test_decoding_routes_through_the_experts():
    """Prefill's logits equal the training forward pass's on the same tokens."""
    model = get_model("moe-tiny", {"shared_experts": "1"})
    cfg = model.cfg
    params = spmd.Layout.make("data=1", devices=jax.devices()[:1]).init_params(
        model.specs(), jax.random.key(0)
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)

    @jax.jit
    def forward_and_prefill(params):
        x, _ = moe.hidden_states(params, tokens, cfg)
        cache = decode.init_cache(cfg, 2, 16)
        pad = jnp.zeros(2, jnp.int32)
        got, _ = decode.prefill(decode.unstack_layers(params), cache, tokens, pad, cfg)
        return gpt.logits_from_hidden(params, x)[:, -1], got

    want, got = forward_and_prefill(params)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    moe_layers = params["layers"]["moe"]
    zeroed = {
        **params,
        "layers": {**params["layers"], "moe": {**moe_layers, "we_down": 0 * moe_layers["we_down"]}},
    }
    _, other = forward_and_prefill(zeroed)
    assert relative(other, got) > 1e-3  # the experts' weights reach the decoded logits


def test_generation_on_an_expert_parallel_mesh_matches_one_device():
    """The generator's layout shards the experts over `expert` and dispatches with
    all_to_all; greedy ids match a single device's."""
    from spmd.inference import Generator, SamplingConfig

    model = get_model("moe-tiny")
    params = spmd.Layout.make("data=1", devices=jax.devices()[:1]).init_params(
        model.specs(), jax.random.key(0)
    )
    params = jax.tree.map(lambda a: 5 * a, params)  # sharper logits: no near-ties to flip
    sc = SamplingConfig(max_new_tokens=6, temperature=0.0)
    prompts = [[100, 101, 102, 32], [40, 41]]
    ids = []
    for spec, n in (("data=1", 1), ("expert=4,data=2", 8)):
        layout = spmd.Layout.make(spec, devices=jax.devices()[:n])
        ids.append(Generator(model, layout, sc).generate(params, prompts).ids)
    assert ids[0] == ids[1] and all(len(row) == 6 for row in ids[0])
