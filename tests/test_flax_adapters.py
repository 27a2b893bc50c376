"""Flax NNX and Linen modules as spmd models: sharded training matches one device, the
parameters are born on their shards, and checkpoints, the compiler report and the
planner's checks take them like spmd's own models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import spmd
from experiments import flax_model
from spmd import checkpoint as ckpt
from spmd.compiler import cost, report
from spmd.compiler.analytic import param_bytes
from spmd.compiler.candidates import check_candidate
from spmd.compiler.program import TrainProgram
from spmd.errors import SpmdError
from spmd.interop.flax_adapter import linen_model, nnx_model
from spmd.train import optim

BATCH, SEQ, STEPS, VOCAB = 8, 32, 3, 384
MESH = "fsdp=4,tensor=2"
# eps=1e-6 as in test_parity: Adam's 1/(|g| + eps) must not amplify float32 rounding in
# near-zero gradient entries, so the comparison measures the layouts.
OPTIM = optim.OptimConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS, eps=1e-6)
NNX_CFG = flax_model.TinyLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=SEQ)


class LinenLM(nn.Module):
    """Embedding, residual MLP blocks, a causal running mean over time, and a head."""

    d: int = 32
    f: int = 64
    layers: int = 2

    @nn.compact
    def __call__(self, tokens_bt):
        def named(*axes):
            return nn.with_logical_partitioning(nn.initializers.normal(0.05), axes)

        x = nn.Embed(VOCAB, self.d, embedding_init=named("vocab", "embed"))(tokens_bt)
        for _ in range(self.layers):
            h = nn.Dense(self.f, kernel_init=named("embed", "mlp"))(nn.LayerNorm()(x))
            x = x + nn.Dense(self.d, kernel_init=named("mlp", "embed"))(nn.gelu(h))
        steps = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        x = jnp.cumsum(x, axis=1) / steps
        return nn.Dense(VOCAB, use_bias=False, kernel_init=named("embed", "vocab"))(x)


MODELS = {
    "nnx": lambda: flax_model.model(NNX_CFG),
    "linen": lambda: linen_model(LinenLM()),
}


def layout_of(mesh: str) -> spmd.Layout:
    n = 1 if mesh == "data=1" else 8
    return spmd.Layout.make(mesh, devices=jax.devices()[:n])


def fixed_batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (STEPS, BATCH, SEQ + 1)).astype(np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def program_for(kind: str, mesh: str) -> TrainProgram:
    return TrainProgram.for_tokens(MODELS[kind](), layout_of(mesh), BATCH, SEQ, optimizer=OPTIM)


def put(program, arrays):
    return {k: jax.device_put(v, program.batch_shardings[k]) for k, v in arrays.items()}


@functools.cache
def nnx_run() -> dict:
    """experiments/flax_model.py at toy size: the NNX model on MESH and on one device."""
    return flax_model.run(NNX_CFG, steps=STEPS, batch=BATCH, seq=SEQ, verbose=False,
                          optimizer=OPTIM)  # fmt: skip


@functools.cache
def linen_trained(mesh: str):
    program = program_for("linen", mesh)
    step = program.compile()
    state = program.init_state(jax.random.key(0))
    losses = []
    for arrays in fixed_batches():
        state, metrics = step(state, put(program, arrays))
        losses.append(float(metrics["loss"]))
    return losses, state


def sharded_and_single(kind: str):
    if kind == "linen":
        return linen_trained(MESH), linen_trained("data=1")
    r = nnx_run()
    return (r["losses"], r["state"]), (r["single"], r["single_state"])


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_sharded_training_matches_one_device(kind):
    (losses, state), (ref_losses, ref_state) = sharded_and_single(kind)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=0)
    assert losses[-1] < losses[0]  # it learns
    params, ref = jax.device_get(state.params), jax.device_get(ref_state.params)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref), strict=True
    ):
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < 1e-5, f"{jax.tree_util.keystr(path)}: relative difference {rel:.2e}"


def test_parameters_are_born_on_the_shards_their_logical_names_ask_for():
    nnx_params = program_for("nnx", MESH).init_state(jax.random.key(0)).params
    assert nnx_params["blocks"]["0"]["qkv"].sharding.spec == P("fsdp", None, "tensor", None)
    assert nnx_params["blocks"]["1"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert nnx_params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert nnx_params["norm"]["scale"].sharding.is_fully_replicated  # no names
    qkv = nnx_params["blocks"]["0"]["qkv"]
    assert qkv.addressable_shards[0].data.shape == (32 // 4, 3, 2 // 2, 16)
    linen = program_for("linen", MESH).init_state(jax.random.key(0)).params
    assert linen["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert linen["Embed_0"]["embedding"].sharding.spec == P("tensor", "fsdp")


def test_checkpoint_round_trip_onto_another_mesh(tmp_path):
    state = nnx_run()["state"]
    saver = ckpt.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
    saver.save(STEPS, state, {"note": "flax"}, {"model": "nnx-tiny-lm"})
    saver.close()
    target = program_for("nnx", "fsdp=2,tensor=2,data=2").abstract_state
    step, restored, meta, config = ckpt.restore_train_state(str(tmp_path), target)
    assert (step, meta["note"], config["model"]) == (STEPS, "flax", "nnx-tiny-lm")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    qkv = restored.params["blocks"]["0"]["qkv"]
    assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
    assert qkv.sharding.mesh.shape["data"] == 2


def test_compiler_report_and_planner_checks_take_a_flax_model():
    program = program_for("nnx", MESH)
    stats = report.compile_stats(program)
    assert stats.collectives and stats.flops_per_device > 0
    assert stats.memory["params_bytes"] == pytest.approx(
        param_bytes(program.model, program.layout.shape), rel=1e-6
    )
    rows = {r["name"]: r for r in report.param_rows(program.model, program.layout)}
    assert rows["blocks/0/qkv"]["logical"][0] == "embed"
    assert rows["blocks/0/qkv"]["per_device_shape"] == [8, 3, 1, 16]
    hw = cost.get_hardware("cpu")
    sizes = {a: 1 for a in spmd.Layout.abstract({}).shape}
    check_candidate(program.model, sizes | {"fsdp": 4, "tensor": 2}, BATCH, 1, hw)
    with pytest.raises(SpmdError, match="heads"):  # 2 heads do not split 4 ways
        check_candidate(program.model, sizes | {"fsdp": 2, "tensor": 4}, BATCH, 1, hw)


def test_module_state_other_than_parameters_is_refused():
    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.norm(x)

    with pytest.raises(SpmdError, match="BatchStat"):
        nnx_model(WithBatchNorm)

    class LinenBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(x)

    with pytest.raises(SpmdError, match="batch_stats"):
        linen_model(LinenBatchNorm(), jax.ShapeDtypeStruct((2, 4), jnp.float32))


def test_a_flax_parameter_cannot_be_created_alone():
    spec = jax.tree.leaves(MODELS["linen"]().specs(), is_leaf=lambda s: hasattr(s, "axes"))[0]
    with pytest.raises(SpmdError, match="created by its module"):
        spec.init(jax.random.key(0), spec.shape, spec.dtype)


def test_the_flax_model_experiment_runs_tiny():
    result = nnx_run()
    assert result["mesh"] == MESH and len(result["losses"]) == STEPS
    assert result["max_rel_diff"] < 1e-5
    assert result["state"].params["blocks"]["0"]["qkv"].sharding.spec == P(
        "fsdp", None, "tensor", None
    )


def test_nnx_list_items_are_matched_by_name_not_position():
    """Twelve layers: their engine keys "0".."11" sort as "0", "1", "10", "11", "2", ...;
    applying the module must still use layer i's kernel at depth i."""

    class Deep(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.normal(1.0), ("embed", "mlp"))
            self.layers = nnx.List(
                [nnx.Linear(4, 4, use_bias=False, kernel_init=init, rngs=rngs) for _ in range(12)]
            )

        def __call__(self, x):
            for layer in self.layers:
                x = jnp.tanh(layer(x))
            return x

    model = nnx_model(Deep, loss=lambda forward, b: jnp.mean(forward(b["x"])),
                      batch_axes={"x": ("batch", None)})  # fmt: skip
    params = model.init(jax.random.key(0))
    assert sorted(params["layers"]) == sorted(str(i) for i in range(12))
    assert model.specs()["layers"]["11"]["kernel"].axes == ("embed", "mlp")
    x = jnp.ones((2, 4))
    want = x
    for i in range(12):
        want = jnp.tanh(want @ params["layers"][str(i)]["kernel"])
    np.testing.assert_allclose(model.cfg.apply(params, x), want, rtol=1e-6)
    assert float(model.loss(params, {"x": x})) == pytest.approx(float(jnp.mean(want)), rel=1e-6)
