"""Matmul FLOPs and bytes accessed of a compiled HLO module, loop trip counts applied.

XLA's own `cost_analysis()` counts a loop body once; a scanned layer stack runs it
n_layers times, so this walks the module with each computation's multiplicity.
"""

from __future__ import annotations

import dataclasses
import math
import re

from spmd.compiler.hlo import (
    NO_COST,
    Computation,
    Instr,
    Module,
    array_shapes,
    attr_computation,
    parse_module,
    shape_bytes,
    shape_elements,
    value_shape,
)
from spmd.compiler.replica_groups import ints


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Matmul FLOPs and HBM bytes of the program, per device, loop trip counts applied."""

    dot_flops: float  # every dot/convolution, counted as often as it runs
    dot_flops_once: float  # the same, each computation counted once (XLA's convention)
    bytes_accessed: float  # operands + results of every executed op, as often as it runs
    bytes_accessed_once: float


def program_cost(module: Module | str) -> ProgramCost:
    module = parse_module(module) if isinstance(module, str) else module
    dot_cache: dict[str, float] = {}
    fusion_cache: dict[str, tuple[dict[int, float], float | None]] = {}
    dots = dots_once = nbytes = nbytes_once = 0.0
    for comp_name, mult in module.multiplicities().items():
        comp = module.computations[comp_name]
        f = sum(_instr_dot_flops(module, comp, i, dot_cache) for i in comp.instrs)
        b = sum(_instr_bytes(module, comp, i, fusion_cache) for i in comp.instrs)
        dots, dots_once = dots + mult * f, dots_once + f
        nbytes, nbytes_once = nbytes + mult * b, nbytes_once + b
    return ProgramCost(dots, dots_once, nbytes, nbytes_once)


def _instr_dot_flops(module: Module, comp: Computation, ins: Instr, cache: dict) -> float:
    if ins.opcode == "dot":
        lhs = array_shapes(value_shape(comp, ins.operands[0]))
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        if not lhs or not m:
            return 0.0
        contracted = math.prod(lhs[0][1][d] for d in ints(m.group(1)))
        return 2.0 * shape_elements(ins.shape) * contracted
    if ins.opcode == "convolution":
        rhs = array_shapes(value_shape(comp, ins.operands[1]))
        out = array_shapes(ins.shape)
        if not rhs or not out:
            return 0.0
        # 2 * outputs * (kernel elements / output features)
        out_features = out[0][1][-1] if out[0][1] else 1
        return 2.0 * shape_elements(ins.shape) * math.prod(rhs[0][1]) / max(out_features, 1)
    if ins.opcode == "fusion":
        called = attr_computation(ins.attrs, "calls")
        if called not in cache:
            fused = module.computations.get(called)
            cache[called] = (
                sum(_instr_dot_flops(module, fused, i, cache) for i in fused.instrs)
                if fused
                else 0.0
            )
        return cache[called]
    return 0.0


def _instr_bytes(module: Module, comp: Computation, ins: Instr, cache: dict) -> float:
    """HBM bytes an op reads and writes. Slices read only the slice, and an in-place
    dynamic-update-slice writes only the update (the stacked-layer buffers of a scan)."""
    if ins.opcode in NO_COST:
        return 0.0
    if ins.opcode == "dynamic-slice":
        return 2.0 * shape_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice":
        return 2.0 * shape_bytes(value_shape(comp, ins.operands[1]))
    operands = [shape_bytes(value_shape(comp, o)) for o in ins.operands]
    result = shape_bytes(ins.shape)
    if ins.opcode == "fusion":
        called = attr_computation(ins.attrs, "calls")
        if called not in cache and called in module.computations:
            cache[called] = _fusion_access(module.computations[called])
        params, root = cache.get(called, ({}, None))
        operands = [params.get(i, b) for i, b in enumerate(operands)]
        result = result if root is None else root
    return result + sum(operands)


def _fusion_access(fused: Computation) -> tuple[dict[int, float], float | None]:
    """Bytes read per parameter (when it is only sliced or updated in place) and bytes
    written (when the root is an in-place dynamic-update-slice)."""
    params: dict[int, float] = {}
    for pos, name in fused.params.items():
        uses = fused.users.get(name, [])
        if uses and all(u.opcode == "dynamic-slice" and p == 0 for u, p in uses):
            params[pos] = sum(shape_bytes(u.shape) for u, _ in uses)
        elif uses and all(u.opcode == "dynamic-update-slice" and p == 0 for u, p in uses):
            params[pos] = 0.0
    root = fused.by_name.get(fused.root)
    written = None
    if root is not None and root.opcode == "dynamic-update-slice":
        written = shape_bytes(value_shape(fused, root.operands[1]))
    return params, written
