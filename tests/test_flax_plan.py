"""`planner.plan` on Flax models: the layouts their logical axes allow are searched, the
best are compiled through TrainProgram and fit, and impossible layouts say why."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import spmd
from experiments import flax_model
from spmd.compiler import analytic, cost, planner
from spmd.errors import SpmdError
from spmd.interop.flax_adapter import linen_model

BATCH, SEQ, VOCAB = 8, 32, 256
NNX_CFG = flax_model.TinyLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=SEQ)


class LinenMLP(nn.Module):
    """Embedding, residual MLP blocks 20 wide (tensor=4 splits them, tensor=8 cannot), head."""

    @nn.compact
    def __call__(self, tokens_bt):
        def named(*axes):
            return nn.with_logical_partitioning(nn.initializers.normal(0.05), axes)

        x = nn.Embed(VOCAB, 32, embedding_init=named("vocab", "embed"))(tokens_bt)
        for _ in range(2):
            h = nn.Dense(20, kernel_init=named("embed", "mlp"))(x)
            x = x + nn.Dense(32, kernel_init=named("mlp", "embed"))(nn.gelu(h))
        x = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        return nn.Dense(VOCAB, use_bias=False, kernel_init=named("embed", "vocab"))(x)


MODELS = {"nnx": lambda: flax_model.model(NNX_CFG), "linen": lambda: linen_model(LinenMLP())}
# A layout each model's parameters cannot take, and the reason the rules give.
IMPOSSIBLE = {
    "nnx": ("fsdp=2,tensor=4", "heads=2 is not divisible by tensor=4"),
    "linen": ("tensor=8", "mlp=20 is not divisible by tensor=8"),
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMD_CACHE_DIR", str(tmp_path / "spmd-cache"))
    return tmp_path / "spmd-cache"


def axes(spec: str) -> dict:
    return spmd.parse_mesh(spec, 8).shape


def plan_of(model):
    return planner.plan(model, 8, "cpu", batch=BATCH, seq=SEQ, grad_accums=(1,),
                        compile_top=2, max_compiles=3, progress=False)  # fmt: skip


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_plans_a_flax_model(kind, cache):
    model = MODELS[kind]()
    p = plan_of(model)
    cpu = cost.get_hardware("cpu")
    assert p.method == "compiled" and 1 <= p.n_compiled <= 3
    assert "activations are unknown" in p.estimate
    best = p.best
    assert best.method == "compiled" and best.fits and best.memory_bytes <= cpu.capacity_bytes
    assert best.report.model_flops_per_step == 6 * model.n_params * BATCH * SEQ  # per token
    # The compiled program holds exactly the parameter shards the layout asks for.
    sizes = best.candidate.sizes
    assert best.report.stats.memory["params_bytes"] == pytest.approx(
        analytic.param_bytes(model, sizes), rel=1e-6
    )
    split = [axes(s.candidate.spec) for s in p.ranked]  # layouts that split the weights
    assert any(a["tensor"] > 1 for a in split) and any(a["fsdp"] > 1 for a in split)
    assert all(s.candidate.remat == planner.OWN_REMAT for s in p.ranked)
    # Every compiled plan needs at least what the parameters-only estimate counts.
    for s in p.ranked:
        if s.method == "compiled":
            low, _ = analytic.parameter_estimate(model, s.candidate, BATCH, SEQ, cpu, "float32")
            assert s.memory_bytes >= low - 2 * 4 * BATCH * SEQ
    mesh, why = IMPOSSIBLE[kind]
    rejected = dict(p.rejected)
    assert rejected[mesh] == why
    assert mesh not in {s.candidate.spec for s in p.ranked}
    assert "needs a dense gpt model" in rejected["stage=8"]  # pipelines run gpt only
    # A module's code is not in its key, so nothing went to the disk cache.
    assert not cache.exists() or not any(cache.rglob("*.json"))


def test_tensor_traffic_is_estimated_from_the_logical_axes():
    """NNX's blocks split q/k/v, out, up and down over tensor: two pairs per layer, each an
    all-reduce forward and backward, as gpt's estimate has it; data=8 has none."""
    model = MODELS["nnx"]()
    cpu = cost.get_hardware("cpu")
    by_spec = {}
    for spec in ("data=4,tensor=2", "data=8"):
        c = planner.Candidate(tuple(axes(spec).items()), planner.OWN_REMAT, 1)
        by_spec[spec] = analytic.parameter_estimate(model, c, BATCH, SEQ, cpu, "float32")[1]
    tp, dp = by_spec["data=4,tensor=2"], by_spec["data=8"]
    assert tp.comm_s > 0 and dp.comm_s > 0
    sizes = axes("data=4,tensor=2")
    tokens = BATCH // 4 * SEQ  # float32 activations 32 wide
    tensor, data = analytic.axis_group(sizes, ("tensor",)), analytic.axis_group(sizes, ("data",))
    allreduce = cost.collective_time("all-reduce", tokens * 32 * 4, 2, tensor, cpu)
    grads = cost.collective_time("all-reduce", analytic.param_bytes(model, sizes), 4, data, cpu)
    assert tp.comm_s == pytest.approx(2 * 2 * NNX_CFG.n_layers * allreduce + grads, rel=1e-9)


def test_a_built_gpt_model_plans_like_its_name():
    overrides = {"n_layers": 2}
    by_name = planner.plan("gpt-tiny", 8, "h100", batch=8, seq=32, overrides=overrides,
                           remats=("none",), method="analytic", progress=False)  # fmt: skip
    built = planner.plan(spmd.get_model("gpt-tiny", overrides), 8, "h100", batch=8, seq=32,
                         method="analytic", progress=False)  # fmt: skip
    assert built.estimate == by_name.estimate == planner.GPT_ESTIMATE
    assert [s.candidate for s in built.ranked] == [s.candidate for s in by_name.ranked]


def test_a_built_model_takes_no_overrides_or_dtype():
    model = MODELS["linen"]()
    with pytest.raises(SpmdError, match="not to a built Model"):
        planner.plan(model, 8, overrides={"n_layers": 2}, progress=False)
    with pytest.raises(SpmdError, match="cannot be applied to the built model 'flax-linen'"):
        planner.plan(model, 8, dtype="bfloat16", progress=False)
    assert jax.device_count() == 8
