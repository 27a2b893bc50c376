"""Collectives, FLOPs and bytes read from a compiled (per-device) HLO module's text.

`compiled.as_text()` is the program one device runs after SPMD partitioning. This module
parses it just enough to answer: which collectives run, how many times per step (loop trip
counts applied), how many bytes each moves, and which mesh axes each one crosses.

Replica groups come in three printed forms, all handled by `parse_replica_groups`:
  explicit  `{{0,2},{1,3}}`
  iota      `[2,2]<=[2,2]T(1,0)`: iota(4).reshape(2,2).transpose(1,0).reshape(2,2) -> groups
  mesh      `mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'a'}`: the devices laid out on a
            (possibly permuted) mesh of XLA's own axes; groups run along the listed axes.
Group members are logical device ids: positions in the program's device assignment, which
for a `jax.sharding.Mesh` is `mesh.devices` flattened. So a group crosses the spmd mesh axes
along which its members' coordinates differ.

XLA:CPU has no reduce-scatter pass: a reduce-scatter is compiled to an all-reduce whose
result feeds only dynamic-slices of 1/k of it. `collectives()` reports that pattern as the
reduce-scatter a GPU or TPU would run, with `raw_kind="all-reduce"` kept alongside.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

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
_NO_COST = {
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
                    visit(_attr_comp(ins.attrs, "body"), m * trips, depth + 1)
                    visit(_attr_comp(ins.attrs, "condition"), m * (trips + 1), depth + 1)
                elif ins.opcode in ("call", "async-start"):
                    visit(
                        _attr_comp(ins.attrs, "to_apply") or _attr_comp(ins.attrs, "calls"),
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
        end = _balanced(rest, 0, "(", ")")
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _balanced(rest, op.end() - 1, "(", ")")
    operands = [_operand_name(o) for o in _split_top(rest[op.end() : end])]
    return Instr(m.group(1), shape, op.group(1), [o for o in operands if o], rest[end + 1 :])


def _operand_name(text: str) -> str:
    text = text.strip()
    names = re.findall(r"%([\w.\-]+)", text)
    return names[-1] if names else text  # parameter(0) keeps "0"


def _balanced(s: str, start: int, open_: str, close: str) -> int:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == open_:
            depth += 1
        elif s[i] == close:
            depth -= 1
            if depth == 0:
                return i
    return len(s) - 1


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


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


def _attr_comp(attrs: str, key: str) -> str:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else ""


def _branches(attrs: str) -> list[str]:
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if m:
        return [b.strip().lstrip("%") for b in m.group(1).split(",")]
    return [c for k in ("true_computation", "false_computation") if (c := _attr_comp(attrs, k))]


# --- Replica groups ------------------------------------------------------------------------

_IOTA = r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?"
_MESH = r"mesh\[[^\]]*\](?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?\s*\{[^}]*\}"


def replica_groups_text(attrs: str) -> str | None:
    """The replica_groups value of an instruction's attributes, in whichever form it has."""
    m = re.search(r"replica_groups=", attrs)
    if not m:
        return None
    rest = attrs[m.end() :]
    if rest.startswith("{"):
        return rest[: _balanced(rest, 0, "{", "}") + 1]
    for pattern in (_IOTA, _MESH):
        mm = re.match(pattern, rest)
        if mm:
            return mm.group(0)
    return rest.split(", ")[0]


def parse_replica_groups(text: str | None, n_devices: int) -> list[list[int]]:
    """Device-id groups from any of XLA's three printed forms. `{}` means one group of all."""
    text = (text or "").strip()
    if not text or text == "{}":
        return [list(range(n_devices))]
    if text.startswith("{"):
        return [
            [int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", text[1:-1])
        ]
    if text.startswith("["):
        return _iota_groups(text)
    if text.startswith("mesh"):
        return _mesh_groups(text)
    raise ValueError(f"unrecognised replica groups {text!r}")


def _iota_array(dims: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    arr = np.arange(math.prod(dims)).reshape(dims)
    return arr.transpose(perm) if perm else arr


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _iota_groups(text: str) -> list[list[int]]:
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        raise ValueError(f"unrecognised iota replica groups {text!r}")
    shape = _ints(m.group(1))
    arr = _iota_array(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
    return arr.reshape(shape[0], -1).tolist()


def _mesh_groups(text: str) -> list[list[int]]:
    m = re.fullmatch(
        r"mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?\s*\{([^}]*)\}", text
    )
    if not m:
        raise ValueError(f"unrecognised mesh replica groups {text!r}")
    names, sizes = [], []
    for part in _split_top(m.group(1)):
        name, _, size = part.rpartition("=")
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    devices = _device_ids(m.group(2), sizes)
    # Split each mesh dimension into the pieces its sub-axes (`'a':(pre)size`) name.
    refs: dict[int, list[tuple[int, int]]] = defaultdict(list)  # dim -> [(pre, size)]
    order = []
    for ref in filter(None, (r.strip() for r in m.group(3).split(","))):
        mm = re.fullmatch(r"['\"]?([^'\":]+)['\"]?(?::\((\d+)\)(\d+))?", ref)
        dim = names.index(mm.group(1))
        pre, size = (int(mm.group(2)), int(mm.group(3))) if mm.group(2) else (1, sizes[dim])
        refs[dim].append((pre, size))
        order.append((dim, pre))
    split_dims, grouped = [], []
    for dim, full in enumerate(sizes):
        pieces, prefix = [], 1
        for pre, size in sorted(refs.get(dim, [])):
            if pre != prefix:
                pieces.append((pre // prefix, False))
                prefix = pre
            pieces.append((size, True))
            prefix *= size
        if prefix != full or not pieces:
            pieces.append((full // prefix, False))
        for size, is_grouped in pieces:
            if is_grouped:
                grouped.append(len(split_dims))
            split_dims.append(size)
    arr = devices.reshape(split_dims)
    rest = [d for d in range(arr.ndim) if d not in grouped]
    group_size = math.prod(split_dims[d] for d in grouped)
    return arr.transpose(rest + grouped).reshape(-1, group_size).tolist()


def _device_ids(text: str | None, sizes: Sequence[int]) -> np.ndarray:
    n = math.prod(sizes)
    if not text:
        return np.arange(n)
    text = text.strip()
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if m:
        return _iota_array(_ints(m.group(1)), _ints(m.group(2)) if m.group(2) else None).reshape(-1)
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if m:
        return _iota_array(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None).reshape(-1)
    ids = [int(x) for x in re.findall(r"\d+", text)]
    return np.asarray(ids[-n:])


def permute_groups(attrs: str) -> list[list[int]]:
    """collective-permute: the connected components of its source->target pairs."""
    m = re.search(r"source_target_pairs=(\{.*?\}\})", attrs)
    pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1)) if m else []
    parent: dict[int, int] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(int(a))] = find(int(b))
    comps: dict[int, list[int]] = defaultdict(list)
    for x in list(parent):
        comps[find(x)].append(x)
    return [sorted(c) for c in comps.values()] or [[0]]


def axes_crossed(groups: Sequence[Sequence[int]], mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes along which members of some group differ (ids in mesh.devices order)."""
    names, sizes = list(mesh_shape), [int(s) for s in mesh_shape.values()]
    n = math.prod(sizes)
    crossed = set()
    for g in groups:
        ids = np.asarray([i for i in g if i < n])
        if len(ids) < 2:
            continue
        coords = np.unravel_index(ids, sizes)
        crossed.update(names[a] for a in range(len(names)) if len(set(coords[a].tolist())) > 1)
    return tuple(a for a in names if a in crossed)


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
    arrays = [a for o in ins.operands for a in array_shapes(_value_shape(comp, o))]
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


def _value_shape(comp: Computation, name: str) -> str:
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
            fused = module.computations.get(_attr_comp(user.attrs, "calls"))
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


# --- FLOPs and bytes -----------------------------------------------------------------------


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
        lhs = array_shapes(_value_shape(comp, ins.operands[0]))
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        if not lhs or not m:
            return 0.0
        contracted = math.prod(lhs[0][1][d] for d in _ints(m.group(1)))
        return 2.0 * shape_elements(ins.shape) * contracted
    if ins.opcode == "convolution":
        rhs = array_shapes(_value_shape(comp, ins.operands[1]))
        out = array_shapes(ins.shape)
        if not rhs or not out:
            return 0.0
        # 2 * outputs * (kernel elements / output features)
        out_features = out[0][1][-1] if out[0][1] else 1
        return 2.0 * shape_elements(ins.shape) * math.prod(rhs[0][1]) / max(out_features, 1)
    if ins.opcode == "fusion":
        called = _attr_comp(ins.attrs, "calls")
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
    if ins.opcode in _NO_COST:
        return 0.0
    if ins.opcode == "dynamic-slice":
        return 2.0 * shape_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice":
        return 2.0 * shape_bytes(_value_shape(comp, ins.operands[1]))
    operands = [shape_bytes(_value_shape(comp, o)) for o in ins.operands]
    result = shape_bytes(ins.shape)
    if ins.opcode == "fusion":
        called = _attr_comp(ins.attrs, "calls")
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
        written = shape_bytes(_value_shape(fused, root.operands[1]))
    return params, written
