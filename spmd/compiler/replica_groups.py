"""Replica groups as XLA prints them, mapped back to device ids and spmd mesh axes.

The three printed forms:
  explicit  `{{0,2},{1,3}}`
  iota      `[2,2]<=[2,2]T(1,0)`: iota(4).reshape(2,2).transpose(1,0).reshape(2,2) -> groups
  mesh      `mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'a'}`: the devices laid out on a
            (possibly permuted) mesh of XLA's own axes; groups run along the listed axes.
Group members are logical device ids: positions in the program's device assignment, which
for a `jax.sharding.Mesh` is `mesh.devices` flattened. So a group crosses the spmd mesh axes
along which its members' coordinates differ.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np


def balanced(s: str, start: int, open_: str, close: str) -> int:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == open_:
            depth += 1
        elif s[i] == close:
            depth -= 1
            if depth == 0:
                return i
    return len(s) - 1


def split_top(s: str) -> list[str]:
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


_IOTA = r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?"
_MESH = r"mesh\[[^\]]*\](?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?\s*\{[^}]*\}"


def replica_groups_text(attrs: str) -> str | None:
    """The replica_groups value of an instruction's attributes, in whichever form it has."""
    m = re.search(r"replica_groups=", attrs)
    if not m:
        return None
    rest = attrs[m.end() :]
    if rest.startswith("{"):
        return rest[: balanced(rest, 0, "{", "}") + 1]
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


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _iota_groups(text: str) -> list[list[int]]:
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        raise ValueError(f"unrecognised iota replica groups {text!r}")
    shape = ints(m.group(1))
    arr = _iota_array(ints(m.group(2)), ints(m.group(3)) if m.group(3) else None)
    return arr.reshape(shape[0], -1).tolist()


def _mesh_groups(text: str) -> list[list[int]]:
    m = re.fullmatch(
        r"mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?\s*\{([^}]*)\}", text
    )
    if not m:
        raise ValueError(f"unrecognised mesh replica groups {text!r}")
    names, sizes = [], []
    for part in split_top(m.group(1)):
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
        return _iota_array(ints(m.group(1)), ints(m.group(2)) if m.group(2) else None).reshape(-1)
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if m:
        return _iota_array(ints(m.group(2)), ints(m.group(3)) if m.group(3) else None).reshape(-1)
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
