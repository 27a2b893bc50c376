"""The planner's search space: layouts (mesh shapes) x remat policies x grad-accum counts.

A candidate is kept only if the train step itself would accept it: every parameter and the
(micro)batch divide over their mesh axes (the same `SpmdError` checks the step makes), and
`tensor` stays inside one node of the hardware.
"""

from __future__ import annotations

import dataclasses

import jax

from spmd import params as param_lib
from spmd.compiler import cost
from spmd.errors import SpmdError
from spmd.layout import Layout
from spmd.mesh import MESH_AXES, MeshConfig
from spmd.models import Model
from spmd.parallel import pipeline as pipeline_lib
from spmd.rules import Rules

# `sequence` joins the search once ring attention exists. A layout with `stage` runs the
# 1F1B pipeline with as many microbatches as the batch allows, up to 8 per stage: the more,
# the smaller the bubble, (S-1)/(M+S-1).
SEARCH_AXES = ("data", "stage", "fsdp", "tensor")
PIPELINE_SCHEDULE = "1f1b"
MICROBATCHES_PER_STAGE = (8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: tuple[tuple[str, int], ...]  # all six axes
    remat: str
    grad_accum: int
    microbatches: int = 0  # pipeline microbatches (1F1B) when `stage` > 1

    def pipeline(self):
        """The PipelineConfig this candidate runs (None without `stage`)."""
        if not self.microbatches:
            return None
        return pipeline_lib.PipelineConfig(PIPELINE_SCHEDULE, self.microbatches)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def spec(self) -> str:
        return MeshConfig(**self.sizes).spec()

    def layout(self, rules: Rules | None = None) -> Layout:
        """Axis sizes only: enough to check and cost it without devices."""
        return Layout.abstract(self.sizes, rules)

    def label(self) -> str:
        pipe = f" {PIPELINE_SCHEDULE} M={self.microbatches}" if self.microbatches else ""
        return f"{self.spec} remat={self.remat} grad_accum={self.grad_accum}{pipe}"


def factorisations(n: int, k: int) -> list[tuple[int, ...]]:
    """Every way to write n as an ordered product of k positive factors."""
    if k == 1:
        return [(n,)]
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return [(d, *rest) for d in divisors for rest in factorisations(n // d, k - 1)]


def check_candidate(model: Model, sizes, batch, grad_accum, hw, rules=None) -> None:
    """Raise SpmdError (naming the culprit) if this layout cannot run the model."""
    if sizes["tensor"] > hw.devices_per_node or hw.devices_per_node % sizes["tensor"]:
        raise SpmdError(
            f"tensor={sizes['tensor']} does not fit in one {hw.name} node of "
            f"{hw.devices_per_node} devices"
        )
    layout = Layout.abstract(sizes, rules)
    for spec in jax.tree.leaves(model.specs(), is_leaf=param_lib.is_spec):
        layout.pspec(spec.axes, spec.shape)
    layout.check_batch(batch, grad_accum)


def pipeline_microbatches(model: Model, sizes, batch, grad_accum, rules=None) -> int:
    """The most microbatches (up to 8 per stage) that 1F1B accepts here; 0 without `stage`.
    Raises SpmdError (the schedule's own check) when none does."""
    stages = sizes["stage"]
    if stages == 1:
        return 0
    layout = Layout.abstract(sizes, rules)
    error = None
    for per_stage in MICROBATCHES_PER_STAGE:
        pipe = pipeline_lib.PipelineConfig(PIPELINE_SCHEDULE, per_stage * stages)
        try:
            pipeline_lib.for_program(pipe, model, layout, batch // grad_accum)
            return pipe.microbatches
        except SpmdError as e:
            error = error or e
    raise error


def enumerate_candidates(
    model: Model, devices: int, hw: cost.Hardware, batch: int, remats, grad_accums, rules=None
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """(candidates that can run, [(mesh, why not)] for those that cannot)."""
    ok, rejected = [], []
    for factors in factorisations(devices, len(SEARCH_AXES)):
        sizes = {a: 1 for a in MESH_AXES} | dict(zip(SEARCH_AXES, factors, strict=True))
        for ga in grad_accums:
            try:
                check_candidate(model, sizes, batch, ga, hw, rules)
                m = pipeline_microbatches(model, sizes, batch, ga, rules)
            except SpmdError as e:
                rejected.append((MeshConfig(**sizes).spec(), str(e)))
                continue
            ok += [Candidate(tuple(sizes.items()), r, ga, m) for r in remats]
    return ok, rejected
