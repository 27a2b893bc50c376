import pytest
from jax.sharding import PartitionSpec as P

import spmd
from spmd.errors import SpmdError
from spmd.rules import Rules, logical_to_spec


@pytest.fixture(scope="module")
def mesh():
    return spmd.make_mesh("data=2,fsdp=2,tensor=2")


def test_default_rules_map_weights_and_activations(mesh):
    assert logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "heads", None), mesh) == P(
        None, "fsdp", "tensor", None
    )
    assert logical_to_spec(("batch", "length", None), mesh) == P(("data", "fsdp"), None, None)


def test_axes_of_size_one_are_dropped():
    mesh = spmd.make_mesh("fsdp=8")
    assert logical_to_spec(("batch", "vocab"), mesh) == P("fsdp", None)


def test_merged_dimension_takes_both_names_axes(mesh):
    assert logical_to_spec((("batch", "length"), "mlp"), mesh) == P(("data", "fsdp"), "tensor")


def test_a_mesh_axis_is_never_used_twice(mesh):
    with pytest.raises(SpmdError, match="would shard both 'batch' and 'embed'"):
        logical_to_spec(("batch", "embed"), mesh)


def test_overrides(mesh):
    rules = Rules.default({"vocab": None, "embed": ("data", "fsdp")})
    assert logical_to_spec(("embed", "vocab"), mesh, rules) == P(("data", "fsdp"), None)


def test_unknown_mesh_axis_in_rules_is_refused():
    with pytest.raises(SpmdError, match="unknown mesh axis 'model'"):
        Rules.default({"heads": "model"})


def test_divisibility_error_names_dimension_and_axis():
    mesh = spmd.make_mesh("data=-1,tensor=4")
    with pytest.raises(SpmdError, match=r"^heads=6 is not divisible by tensor=4$"):
        logical_to_spec(("embed", "heads"), mesh, shape=(64, 6))
    with pytest.raises(SpmdError, match=r"batch=3 is not divisible by data=2"):
        logical_to_spec(("batch",), mesh, shape=(3,))


def test_kv_heads_replicate_where_tensor_does_not_divide_them():
    mesh = spmd.make_mesh("data=2,tensor=4")
    assert logical_to_spec(("embed", "kv_heads"), mesh, shape=(64, 2)) == P(None, None)
    assert logical_to_spec(("embed", "kv_heads"), mesh, shape=(64, 8)) == P(None, "tensor")
    with pytest.raises(SpmdError, match="heads=6 is not divisible by tensor=4"):
        logical_to_spec(("embed", "heads"), mesh, shape=(64, 6))


def test_a_logical_axis_without_a_rule_is_refused(mesh):
    with pytest.raises(SpmdError, match="logical axis 'mlpp' has no rule"):
        logical_to_spec(("embed", "mlpp"), mesh)
    assert logical_to_spec(("mlpp",), mesh, Rules.default({"mlpp": None})) == P(None)
