"""The layer scan's auto unroll (the default `scan_unroll=0`): whole shallow stacks on CPU,
except where unrolling would change what the step holds (remat, FSDP gathers)."""

import jax
import pytest

import spmd
from spmd.compiler.program import TrainProgram
from spmd.models import get_model
from spmd.models.unroll import AUTO_MAX_LAYERS, layer_unroll


@pytest.mark.parametrize(
    "mesh, remat, depth, want",
    [
        ("data=1", "none", 6, 6),  # one device: the whole stack
        ("data=8", "none", 4, 4),  # data parallel gathers no weight
        ("tensor=2,data=4", "none", 4, 4),  # tensor splits weights but never gathers them
        ("data=1", "dots", 4, 1),  # unrolled, CSE would merge the recomputed forward
        ("data=1", "full", 4, 1),
        ("fsdp=2,data=4", "none", 4, 1),  # the backward would keep the gathered weights
        ("data=1", "none", AUTO_MAX_LAYERS + 1, 1),  # deep: compile time grows unrolled
    ],
)
def test_auto_unrolls_where_the_step_holds_the_same(mesh, remat, depth, want):
    devices = jax.devices()[: 1 if mesh == "data=1" else 8]
    layout = spmd.Layout.make(mesh, devices=devices)
    assert layout.traced(lambda: layer_unroll(0, depth, remat))() == want


def test_a_positive_scan_unroll_is_taken_as_given():
    layout = spmd.Layout.make("fsdp=2,data=4")
    assert layout.traced(lambda: layer_unroll(2, 4, "full"))() == 2


@pytest.mark.parametrize("remat, loops", [("none", False), ("full", True)])
def test_the_compiled_default_step_loops_over_layers_only_under_remat(remat, loops):
    layout = spmd.Layout.make("data=1", devices=jax.devices()[:1])
    model = get_model("gpt-tiny", {"n_layers": 2, "remat": remat})
    hlo = TrainProgram.for_tokens(model, layout, 4, 32).compile().executable.as_text()
    assert (" while(" in hlo) == loops
