import jax
import pytest

import spmd
from spmd.errors import SpmdError
from spmd.mesh import MESH_AXES, parse_mesh


def test_string_and_dict_give_the_same_mesh():
    a = spmd.make_mesh("fsdp=4,tensor=2")
    b = spmd.make_mesh({"fsdp": 4, "tensor": 2})
    assert a.axis_names == b.axis_names == MESH_AXES
    assert dict(a.shape) == dict(b.shape)
    assert dict(a.shape) == {
        "data": 1,
        "stage": 1,
        "fsdp": 4,
        "sequence": 1,
        "expert": 1,
        "tensor": 2,
    }


def test_axes_are_auto_and_tensor_is_innermost():
    mesh = spmd.make_mesh("data=2,tensor=4")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    # tensor is the fastest-varying axis: neighbouring device ids share a data index.
    ids = [[d.id for d in row] for row in mesh.devices.reshape(2, 4)]
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_minus_one_takes_the_rest():
    assert parse_mesh("data=-1,tensor=2", 8).data == 4
    assert parse_mesh({"fsdp": -1}, 8).fsdp == 8


def test_mesh_on_a_subset_of_devices():
    mesh = spmd.make_mesh("tensor=4", jax.devices()[:4])
    assert mesh.devices.size == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fsdp=4", "has 4 devices but 8 are available"),
        ("pipeline=8", "unknown mesh axis 'pipeline'"),
        ("data=-1,fsdp=-1", "at most one mesh axis may be -1"),
        ("data=-1,tensor=3", "not divisible by 3"),
        ("fsdp=two", "not an integer"),
        ("fsdp", "must look like axis=size"),
        ("data=0", "must be positive"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(SpmdError, match=message):
        spmd.make_mesh(spec)


def test_simulate_after_start_with_another_count_is_a_clear_error():
    jax.devices()  # the backend has started with 8
    spmd.simulate_cpu_devices(8)  # the same count: fine
    with pytest.raises(SpmdError, match="already started with 8"):
        spmd.simulate_cpu_devices(4)
