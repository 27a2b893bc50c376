"""Collectives, FLOPs and bytes read from a compiled (per-device) HLO module's text.

`compiled.as_text()` is the program one device runs after SPMD partitioning. This module
parses it just enough to answer: which collectives run, how many times per step (loop trip
counts applied), how many bytes each moves, and which mesh axes each one crosses.

Replica groups, in their three printed forms, are parsed in `replica_groups.py`; matmul
FLOPs and bytes accessed of the whole program are counted in `program_cost.py`.

XLA:CPU has no reduce-scatter pass: a reduce-scatter is compiled to an all-reduce whose
result feeds only dynamic-slices of 1/k of it. `collectives()` reports that pattern as the
reduce-scatter a GPU or TPU would run, with `raw_kind="all-reduce"` kept alongside.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping

from spmd.compiler.replica_groups import (  # noqa: F401  (parse_replica_groups is re-exported)
    axes_crossed,
    balanced,
    parse_replica_groups,
    permute_groups,
    replica_groups_text,
    split_top,
)

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODE_KIND = {
    **{k: k for k in KINDS},
    **{f"{k}-start": k for k in KINDS},
    "ragged-all-to-all": "all-to-all",
}
DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}  # fmt: skip
_FP8 = re.compile(r"f8e\w+|f4e\w+")
# Ops that move no data of their own (views, plumbing, control flow handled by recursion).
NO_COST = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
    "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done",
    "async-update", "copy-done", "send-done", "recv-done",
}  # fmt: skip
_PASS_THROUGH = {"bitcast", "copy", "reshape", "transpose", "convert"}
# A fusion made only of these keeps every element of its input (a cast, a scale, a copy).
_ELEMENTWISE = _PASS_THROUGH | {
    "parameter", "constant", "broadcast", "multiply", "add", "subtract", "divide", "negate",
}  # fmt: skip


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    is_entry: bool = False
    root: str = ""

    def __post_init__(self):
        self.root = self.root or (self.instrs[-1].name if self.instrs else "")
        self.by_name = {i.name: i for i in self.instrs}
        self.params = {
            int(m.group(1)): i.name
            for i in self.instrs
            if i.opcode == "parameter"
            and (m := re.match(r"(\d+)", i.operands[0] if i.operands else ""))
        }
        self.users: dict[str, list[tuple[Instr, int]]] = defaultdict(list)
        for i in self.instrs:
            for pos, op in enumerate(i.operands):
                self.users[op].append((i, pos))


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str

    def multiplicities(self) -> dict[str, float]:
        """How many times each executed (non-fused) computation runs per call of the entry."""
        mult: dict[str, float] = defaultdict(float)

        def visit(name: str, m: float, depth: int = 0):
            comp = self.computations.get(name)
            if comp is None or depth > 64:
                return
            mult[name] += m
            for ins in comp.instrs:
                if ins.opcode == "while":
                    trips = trip_count(ins) or 1
                    visit(attr_computation(ins.attrs, "body"), m * trips, depth + 1)
                    visit(attr_computation(ins.attrs, "condition"), m * (trips + 1), depth + 1)
                elif ins.opcode in ("call", "async-start"):
                    visit(
                        attr_computation(ins.attrs, "to_apply")
                        or attr_computation(ins.attrs, "calls"),
                        m,
                        depth + 1,
                    )
                elif ins.opcode == "conditional":
                    for branch in _branches(ins.attrs):
                        visit(branch, m, depth + 1)  # an upper bound: every branch counted

        visit(self.entry, 1.0)
        return dict(mult)


@dataclasses.dataclass
class Collective:
    """One collective op of the compiled program (per device)."""

    name: str
    kind: str  # what a GPU/TPU runs: all-reduce, all-gather, reduce-scatter, ...
    raw_kind: str  # the op in this HLO (an all-reduce for XLA:CPU's reduce-scatter pattern)
    count: float  # executions per step (loop trip counts applied)
    operand_bytes: int  # per execution, tuples summed
    result_bytes: int
    group_size: int
    n_groups: int
    axes: tuple[str, ...]  # spmd mesh axes the groups cross
    group: tuple[int, ...]  # one group's device ids (the others are its translates)
    computation: str = ""

    @property
    def bytes(self) -> int:
        """The buffer one execution works on: the full (gathered / unreduced) size."""
        return max(self.operand_bytes, self.result_bytes)

    @property
    def total_bytes(self) -> float:
        return self.count * self.bytes

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "raw_kind": self.raw_kind,
            "count": self.count,
            "bytes": self.bytes,
            "operand_bytes": self.operand_bytes,
            "result_bytes": self.result_bytes,
            "group_size": self.group_size,
            "n_groups": self.n_groups,
            "axes": list(self.axes),
            "group": list(self.group),
            "computation": self.computation,
        }

    @classmethod
    def from_json(cls, d: Mapping) -> Collective:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        return cls(**kw | {"axes": tuple(d["axes"]), "group": tuple(d["group"])})


# --- Parsing -------------------------------------------------------------------------------


def parse_module(text: str) -> Module:
    """Computations and their instructions from `compiled.as_text()` (or any HLO text)."""
    comps: dict[str, Computation] = {}
    entry = ""
    current: list[Instr] | None = None
    name, is_entry, root = "", False, ""
    for raw in text.splitlines():
        line = raw.strip()
        if current is None:
            m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{$", line)
            if m and not line.startswith("HloModule"):
                current, name, is_entry, root = [], m.group(2), bool(m.group(1)), ""
            continue
        if line == "}":
            comps[name] = Computation(name, current, is_entry, root)
            entry = name if is_entry else entry
            current = None
            continue
        ins = parse_instruction(line)
        if ins is not None:
            current.append(ins)
            root = ins.name if line.startswith("ROOT") else root
    if not entry and comps:
        entry = next(reversed(comps))
    return Module(comps, entry)


def parse_instruction(line: str) -> Instr | None:
    line = re.sub(r"/\*.*?\*/", "", line.strip())
    m = re.match(r"(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):
        end = balanced(rest, 0, "(", ")")
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = balanced(rest, op.end() - 1, "(", ")")
    operands = [_operand_name(o) for o in split_top(rest[op.end() : end])]
    return Instr(m.group(1), shape, op.group(1), [o for o in operands if o], rest[end + 1 :])


def _operand_name(text: str) -> str:
    text = text.strip()
    names = re.findall(r"%([\w.\-]+)", text)
    return names[-1] if names else text  # parameter(0) keeps "0"


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """`(f32[2,3]{1,0}, s32[])` -> [("f32", (2, 3)), ("s32", ())]."""
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d.strip()))
        for dt, dims in re.findall(r"\b([a-z]+\d*(?:e\w+)?)\[([\d,\s]*)\]", shape)
    ]


def _dtype_bytes(dt: str) -> float:
    if dt in DTYPE_BYTES:
        return DTYPE_BYTES[dt]
    return 1 if _FP8.fullmatch(dt) else 4


def shape_bytes(shape: str) -> int:
    return int(sum(_dtype_bytes(dt) * math.prod(dims) for dt, dims in array_shapes(shape)))


def shape_elements(shape: str) -> int:
    return sum(math.prod(dims) for _, dims in array_shapes(shape))


def trip_count(ins: Instr) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    return int(m.group(1)) if m else None


def attr_computation(attrs: str, key: str) -> str:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else ""


def _branches(attrs: str) -> list[str]:
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if m:
        return [b.strip().lstrip("%") for b in m.group(1).split(",")]
    return [
        c for k in ("true_computation", "false_computation") if (c := attr_computation(attrs, k))
    ]


# --- Collectives ---------------------------------------------------------------------------


def collectives(module: Module | str, mesh_shape: Mapping[str, int]) -> list[Collective]:
    """Every collective the device runs per step, with the CPU reduce-scatter pattern named."""
    module = parse_module(module) if isinstance(module, str) else module
    n_devices = math.prod(int(v) for v in mesh_shape.values())
    out: list[Collective] = []
    for comp_name, mult in module.multiplicities().items():
        comp = module.computations[comp_name]
        for ins in comp.instrs:
            kind = _OPCODE_KIND.get(ins.opcode)
            if kind is not None:
                out += _collective(module, comp, ins, kind, mult, mesh_shape, n_devices)
    return out


def bytes_over(cols: list[Collective], axes: tuple[str, ...]) -> float:
    """Bytes per step, per device, of the collectives that cross any of the mesh `axes`."""
    return float(sum(c.total_bytes for c in cols if set(c.axes) & set(axes)))


def _collective(module, comp, ins, kind, mult, mesh_shape, n_devices) -> list[Collective]:
    if kind == "collective-permute":
        groups = permute_groups(ins.attrs)
    else:
        groups = parse_replica_groups(replica_groups_text(ins.attrs), n_devices)
    size = max(len(g) for g in groups)
    base = {
        "name": ins.name,
        "raw_kind": kind,
        "count": mult,
        "group_size": size,
        "n_groups": len(groups),
        "axes": axes_crossed(groups, mesh_shape),
        "group": tuple(sorted(groups[0])),
        "computation": comp.name,
    }
    arrays = [a for o in ins.operands for a in array_shapes(value_shape(comp, o))]
    operand_bytes = int(sum(_dtype_bytes(dt) * math.prod(dims) for dt, dims in arrays))
    result_bytes = _result_bytes(ins, kind, operand_bytes, size)
    scattered = []
    if kind == "all-reduce" and size > 1:
        scattered = _scattered_elements(module, comp, ins, len(arrays))
    if not scattered:
        return [
            Collective(kind=kind, operand_bytes=operand_bytes, result_bytes=result_bytes, **base)
        ]
    # Report the sliced elements as the reduce-scatter a GPU/TPU runs; the rest stays.
    sb = int(sum(_dtype_bytes(arrays[i][0]) * math.prod(arrays[i][1]) for i in scattered))
    out = [Collective(kind="reduce-scatter", operand_bytes=sb, result_bytes=sb // size, **base)]
    if len(scattered) < len(arrays):
        rest_bytes = operand_bytes - sb
        out.append(Collective(kind=kind, operand_bytes=rest_bytes, result_bytes=rest_bytes, **base))
    return out


def value_shape(comp: Computation, name: str) -> str:
    ins = comp.by_name.get(name)
    return ins.shape if ins else ""


def _result_bytes(ins: Instr, kind: str, operand_bytes: int, size: int) -> int:
    if not ins.opcode.endswith("-start"):
        return shape_bytes(ins.shape)
    # Async starts return (operands, results, scratch...) tuples: derive the result instead.
    scale = {"all-gather": size, "reduce-scatter": 1 / size}.get(kind, 1)
    return int(operand_bytes * scale)


def _scattered_elements(module: Module, comp: Computation, ins: Instr, n: int) -> list[int]:
    """Tuple indices of an all-reduce whose reduced value is only ever dynamic-sliced."""
    if n == 1 and not ins.shape.startswith("("):
        full = shape_elements(ins.shape)
        return [0] if _only_sliced(module, comp, ins.name, full) else []
    found = []
    for user, _ in comp.users.get(ins.name, []):
        if user.opcode != "get-tuple-element":
            return []  # the tuple escapes whole; leave it an all-reduce
        idx = int(re.search(r"index=(\d+)", user.attrs).group(1))
        if _only_sliced(module, comp, user.name, shape_elements(user.shape)):
            found.append(idx)
    return sorted(set(found))


def _only_sliced(module: Module, comp: Computation, name: str, full: int, depth: int = 0) -> bool:
    """True if every use of `name` (through views and into fusions) is a dynamic-slice of it
    that keeps a fraction of its elements: the tell-tale of a reduce-scatter."""
    users = comp.users.get(name, [])
    if not users or depth > 8:
        return False
    for user, pos in users:
        if user.opcode == "dynamic-slice" and pos == 0:
            if not shape_elements(user.shape) < full:
                return False
        elif user.opcode in _PASS_THROUGH:
            if not _only_sliced(module, comp, user.name, full, depth + 1):
                return False
        elif user.opcode == "fusion":
            fused = module.computations.get(attr_computation(user.attrs, "calls"))
            param = fused.params.get(pos) if fused else None
            if param is None:
                return False
            if _only_sliced(module, fused, param, full, depth + 1):
                continue
            elementwise = all(i.opcode in _ELEMENTWISE for i in fused.instrs)
            if not (elementwise and shape_elements(user.shape) == full):
                return False
            if not _only_sliced(module, comp, user.name, full, depth + 1):
                return False
        else:
            return False
    return True
