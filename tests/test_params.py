import chex
import jax
import jax.numpy as jnp
import numpy as np

import spmd
from spmd import params as P
from spmd.models import gpt


def test_one_declaration_gives_abstract_shardings_and_init():
    specs = gpt.param_specs(spmd.get_model("gpt-tiny").cfg)
    mesh = spmd.make_mesh("fsdp=4,tensor=2")
    abstract = P.abstract(specs)
    shardings = P.shardings(specs, mesh)
    values = P.init(specs, jax.random.key(0), mesh)
    chex.assert_trees_all_equal_shapes_and_dtypes(values, abstract)
    for value, sharding in zip(jax.tree.leaves(values), jax.tree.leaves(shardings), strict=True):
        assert value.sharding.is_equivalent_to(sharding, value.ndim)


def test_params_are_born_sharded_not_gathered():
    specs = {"w": P.ParamSpec((64, 32), ("embed", "mlp"), P.normal(1.0))}
    mesh = spmd.make_mesh("fsdp=4,tensor=2")
    w = P.init(specs, jax.random.key(0), mesh)["w"]
    assert {s.data.shape for s in w.addressable_shards} == {(16, 16)}


def test_init_does_not_depend_on_the_mesh():
    specs = gpt.param_specs(spmd.get_model("gpt-tiny").cfg)
    one = P.init(specs, jax.random.key(3), spmd.make_mesh("data=1", jax.devices()[:1]))
    eight = P.init(specs, jax.random.key(3), spmd.make_mesh("fsdp=4,tensor=2"))
    chex.assert_trees_all_equal(jax.device_get(one), jax.device_get(eight))


def test_count_and_bytes():
    specs = {
        "a": P.ParamSpec((3, 4), (None, None), P.zeros),
        "b": P.ParamSpec((5,), (None,), P.ones, jnp.bfloat16),
    }
    assert P.count(specs) == 17
    assert P.nbytes(specs) == 12 * 4 + 5 * 2
    values = P.init_unsharded(specs, jax.random.key(0))
    np.testing.assert_array_equal(values["b"], np.ones(5))
