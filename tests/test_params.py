import chex
import jax
import jax.numpy as jnp
import numpy as np

import spmd
from spmd import params as param_lib
from spmd.models import gpt


def test_one_declaration_gives_abstract_shardings_and_init():
    specs = gpt.param_specs(spmd.get_model("gpt-tiny").cfg)
    layout = spmd.Layout.make("fsdp=4,tensor=2")
    abstract = param_lib.abstract(specs)
    shardings = layout.param_shardings(specs)
    values = layout.init_params(specs, jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(values, abstract)
    for value, sharding in zip(jax.tree.leaves(values), jax.tree.leaves(shardings), strict=True):
        assert value.sharding.is_equivalent_to(sharding, value.ndim)


def test_params_are_born_sharded_not_gathered():
    specs = {"w": param_lib.ParamSpec((64, 32), ("embed", "mlp"), param_lib.normal(1.0))}
    w = spmd.Layout.make("fsdp=4,tensor=2").init_params(specs, jax.random.key(0))["w"]
    assert {s.data.shape for s in w.addressable_shards} == {(16, 16)}


def test_init_does_not_depend_on_the_mesh():
    specs = gpt.param_specs(spmd.get_model("gpt-tiny").cfg)
    one = spmd.Layout.make("data=1", devices=jax.devices()[:1]).init_params(
        specs, jax.random.key(3)
    )
    eight = spmd.Layout.make("fsdp=4,tensor=2").init_params(specs, jax.random.key(3))
    chex.assert_trees_all_equal(jax.device_get(one), jax.device_get(eight))


def test_count_and_bytes():
    specs = {
        "a": param_lib.ParamSpec((3, 4), (None, None), param_lib.zeros),
        "b": param_lib.ParamSpec((5,), (None,), param_lib.ones, jnp.bfloat16),
    }
    assert param_lib.count(specs) == 17
    assert param_lib.nbytes(specs) == 12 * 4 + 5 * 2
    values = param_lib.init_unsharded(specs, jax.random.key(0))
    np.testing.assert_array_equal(values["b"], np.ones(5))
