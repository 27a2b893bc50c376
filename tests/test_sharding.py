"""The compiled step really is sharded: FSDP splits weights 8 ways, the optimizer state
follows the parameters, and tensor parallelism splits heads and the MLP."""

import math

import jax
import numpy as np
import pytest

import spmd
from spmd.compiler.program import TrainProgram
from spmd.models import get_model
from spmd.train import optim


def stepped_state(mesh_spec: str):
    """The state after one compiled step, so the shardings are those the step produces."""
    program = TrainProgram.for_tokens(
        get_model("gpt-tiny", {"n_layers": 2}),
        spmd.Layout.make(mesh_spec),
        8,
        16,
        optimizer=optim.OptimConfig(total_steps=2),
    )
    sh = program.batch_shardings
    batch = {k: jax.device_put(np.ones(s, np.int32), sh[k]) for k, s in program.shapes.items()}
    state, _ = program.compile()(program.init_state(jax.random.key(0)), batch)
    return state


def shard_shape(x):
    shapes = {s.data.shape for s in x.addressable_shards}
    assert len(shapes) == 1
    return shapes.pop()


@pytest.fixture(scope="module")
def fsdp_state():
    return stepped_state("fsdp=8")


def test_fsdp_shards_every_weight_matrix_eight_ways(fsdp_state):
    for path, x in jax.tree_util.tree_leaves_with_path(fsdp_state.params):
        if x.ndim >= 2 and "norm" not in jax.tree_util.keystr(path):
            assert math.prod(shard_shape(x)) * 8 == x.size, jax.tree_util.keystr(path)
    total = sum(x.size for x in jax.tree.leaves(fsdp_state.params))
    local = sum(math.prod(shard_shape(x)) for x in jax.tree.leaves(fsdp_state.params))
    assert local / total < 1 / 8 + 0.01  # only the small norm scales are replicated


def test_optimizer_state_is_sharded_like_the_parameters(fsdp_state):
    adam = fsdp_state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        for p, m in zip(jax.tree.leaves(fsdp_state.params), jax.tree.leaves(moments), strict=True):
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim)
            assert shard_shape(m) == shard_shape(p)


def test_tensor_parallel_splits_heads_and_mlp():
    state = stepped_state("data=2,tensor=4")
    layers = state.params["layers"]
    l, d, h, k = layers["wq"].shape
    assert shard_shape(layers["wq"]) == (l, d, h // 4, k)
    assert shard_shape(layers["wk"])[2] == layers["wk"].shape[2] // 4
    assert shard_shape(layers["wo"]) == (l, h // 4, k, d)
    f = layers["w_gate"].shape[-1]
    assert shard_shape(layers["w_gate"]) == (l, d, f // 4)
    assert shard_shape(layers["w_down"]) == (l, f // 4, d)
