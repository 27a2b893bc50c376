"""spmd.compiler.hlo on HLO fixtures from real compiles (tests/fixtures/hlo); no compiling."""

from pathlib import Path

import pytest

from spmd.compiler import hlo
from spmd.compiler.program_cost import program_cost
from spmd.mesh import MESH_AXES

FIXTURES = Path(__file__).parent / "fixtures" / "hlo"


def mesh(spec: str) -> dict[str, int]:
    sizes = dict(part.split("=") for part in spec.split(","))
    return {a: int(sizes.get(a, 1)) for a in MESH_AXES}


def fixture_lines():
    for line in (FIXTURES / "replica_groups.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            spec, text, axes = (part.strip() for part in line.split("|"))
            yield spec, text, tuple(filter(None, axes.split(",")))


def test_fixture_covers_all_three_forms():
    forms = {text[0] for _, text, _ in fixture_lines()}
    assert forms == {"{", "[", "m"}  # explicit, iota, mesh
    assert any("device_ids=" in text for _, text, _ in fixture_lines())


@pytest.mark.parametrize("spec,text,axes", list(fixture_lines()))
def test_replica_groups_map_to_mesh_axes(spec, text, axes):
    groups = hlo.parse_replica_groups(text, 8)
    assert sorted(i for g in groups for i in g) == list(range(8))  # a partition of devices
    assert hlo.axes_crossed(groups, mesh(spec)) == axes


def test_the_three_forms_agree():
    # One grouping (fsdp on fsdp=4,tensor=2: ids f*2+t), as XLA prints it three ways.
    explicit = hlo.parse_replica_groups("{{0,2,4,6},{1,3,5,7}}", 8)
    iota = hlo.parse_replica_groups("[2,4]<=[4,2]T(1,0)", 8)
    on_mesh = hlo.parse_replica_groups(
        "mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}", 8
    )
    assert explicit == iota == on_mesh


def test_sub_axis_and_empty_groups():
    # `'a':(2)2` is the middle factor of a=8 split (2,2,2): ids i*4 + j*2 + k, j varying.
    groups = hlo.parse_replica_groups("mesh['a'=8] {'a':(2)2}", 8)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert hlo.parse_replica_groups("{}", 4) == [[0, 1, 2, 3]]


def test_every_collective_kind_from_shard_map():
    cs = hlo.collectives(
        (FIXTURES / "shard_map_collectives.hlo").read_text(), mesh("fsdp=4,tensor=2")
    )
    by_kind = {c.kind: c for c in cs}
    assert set(by_kind) == set(hlo.KINDS)
    # x is f32[16,16] per device (1 kB).
    assert (
        by_kind["all-reduce"].axes == ("fsdp", "tensor") and by_kind["all-reduce"].group_size == 8
    )
    assert by_kind["reduce-scatter"].axes == ("fsdp",)
    assert (by_kind["reduce-scatter"].operand_bytes, by_kind["reduce-scatter"].result_bytes) == (
        1024,
        256,
    )
    assert by_kind["all-gather"].axes == ("tensor",) and by_kind["all-gather"].bytes == 2048
    assert by_kind["all-to-all"].axes == ("fsdp",) and by_kind["all-to-all"].bytes == 1024
    assert by_kind["collective-permute"].axes == ("tensor",)


def test_scan_step_loops_and_cpu_reduce_scatter_pattern():
    text = (FIXTURES / "fsdp_tp_scan_step.hlo").read_text()
    cs = hlo.collectives(text, mesh("fsdp=4,tensor=2"))
    gathers = [c for c in cs if c.kind == "all-gather"]
    assert gathers and all(c.axes == ("fsdp",) and c.count == 2 for c in gathers)  # 2 layers
    assert all(c.bytes == 64 * 16 * 4 for c in gathers)  # one layer's (64, 32/2) weight
    tp = [c for c in cs if c.kind == "all-reduce"]
    assert tp and all(c.axes == ("tensor",) for c in tp)
    (rs,) = [c for c in cs if c.kind == "reduce-scatter"]
    assert rs.raw_kind == "all-reduce" and rs.axes == ("fsdp",)
    assert rs.result_bytes * 4 == rs.operand_bytes


def test_program_cost_counts_loop_iterations():
    cost = program_cost((FIXTURES / "fsdp_tp_scan_step.hlo").read_text())
    assert cost.dot_flops > cost.dot_flops_once > 0
    assert cost.bytes_accessed > cost.bytes_accessed_once > 0


ASYNC = """\
HloModule async_example, num_partitions=4

ENTRY %main (p: f32[16,8]) -> f32[64,8] {
  %p = f32[16,8]{1,0} parameter(0)
  %ags = (f32[16,8]{1,0}, f32[64,8]{1,0}) all-gather-start(%p), replica_groups=[1,4]<=[4], \
dimensions={0}
  ROOT %agd = f32[64,8]{1,0} all-gather-done(%ags)
}
"""


def test_async_start_counts_once_with_derived_result():
    # Hand-written in the shape XLA:GPU prints (XLA:CPU emits no async collectives).
    (c,) = hlo.collectives(ASYNC, {"data": 1, "fsdp": 4})
    assert (c.kind, c.raw_kind, c.count, c.group_size) == ("all-gather", "all-gather", 1, 4)
    assert (c.operand_bytes, c.result_bytes) == (512, 2048)
    assert c.axes == ("fsdp",)


def test_shapes_and_instructions():
    ins = hlo.parse_instruction(
        "%t = (f32[2,3]{1,0}, /*index=1*/bf16[4]{0}) tuple(%a, %b), sharding={replicated}"
    )
    assert (ins.name, ins.opcode, ins.operands) == ("t", "tuple", ["a", "b"])
    assert hlo.shape_bytes(ins.shape) == 2 * 3 * 4 + 4 * 2
    assert hlo.shape_bytes("pred[]") == 1
