"""The automatic planner: search mesh layouts, remat policies and grad-accum counts.

1. Enumerate: every factorisation of the devices over `SEARCH_AXES` that divides every
   parameter and the (micro)batch (the same checks the train step makes: SpmdError), with
   `tensor` inside one node, times each remat policy and grad-accum count.
2. Pre-filter analytically: per-device memory (exact parameter/optimizer shards plus an
   activation model) and a roofline step time with ring-cost communication. Cheap.
3. Compile the best few ahead of time on simulated devices (as `spmd explain` does), drop
   those whose compiled program does not fit, rank the rest by predicted step time. Each
   compile calibrates the activation-memory estimate for the candidates still to come.
   Compiles are cached on disk (`$SPMD_CACHE_DIR`, default ~/.cache/spmd).
Beyond `SIMULATION_LIMIT` devices (or when JAX runs on a different device count) step 3 is
skipped and the analytic estimate decides; every result says which method produced it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax

from spmd import params as P
from spmd.compiler import cost, report
from spmd.compiler.analytic import _param_bytes, abstract_mesh, analytic_estimate
from spmd.errors import SpmdError
from spmd.mesh import MESH_AXES, MeshConfig
from spmd.models import Model
from spmd.rules import Rules, logical_to_spec

# `sequence` and `stage` join the search once ring attention and pipelining exist.
SEARCH_AXES = ("data", "fsdp", "tensor")
REMATS = ("none", "dots", "full")
SIMULATION_LIMIT = 512  # above this, compiling on simulated CPU devices gets slow
ANALYTIC_SLACK = 1.25  # compile candidates the analytic model puts up to 25% over memory


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: tuple[tuple[str, int], ...]  # all six axes
    remat: str
    grad_accum: int

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def spec(self) -> str:
        return MeshConfig(**self.sizes).spec()

    def label(self) -> str:
        return f"{self.spec} remat={self.remat} grad_accum={self.grad_accum}"


@dataclasses.dataclass
class Scored:
    candidate: Candidate
    method: str  # "compiled" or "analytic"
    memory_bytes: float
    fits: bool
    prediction: cost.Prediction
    report: report.Report | None = None

    def to_json(self) -> dict:
        c = self.candidate
        return {
            "mesh": c.spec,
            "mesh_axes": c.sizes,
            "remat": c.remat,
            "grad_accum": c.grad_accum,
            "method": self.method,
            "memory_bytes": self.memory_bytes,
            "fits": self.fits,
            "predicted": self.prediction.to_json(),
        }


@dataclasses.dataclass
class Plan:
    model: str
    devices: int
    hardware: cost.Hardware
    batch: int
    seq: int
    method: str  # how the winner was scored
    why: str  # why that method
    ranked: list[Scored]  # fitting plans, best first
    n_candidates: int
    n_analytic_fit: int
    n_compiled: int
    wall_s: float

    @property
    def best(self) -> Scored:
        return self.ranked[0]

    def to_json(self, top: int) -> dict:
        return {
            "model": self.model,
            "devices": self.devices,
            "hardware": self.hardware.name,
            "batch": self.batch,
            "seq": self.seq,
            "method": self.method,
            "why": self.why,
            "mesh": self.best.candidate.spec,
            "remat": self.best.candidate.remat,
            "grad_accum": self.best.candidate.grad_accum,
            "candidates": self.n_candidates,
            "analytic_fit": self.n_analytic_fit,
            "compiled": self.n_compiled,
            "wall_s": self.wall_s,
            "top": [s.to_json() for s in self.ranked[:top]],
        }


# --- Candidates ----------------------------------------------------------------------------


def _factorisations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    return [(d, *rest) for d in _divisors(n) for rest in _factorisations(n // d, k - 1)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_candidate(model: Model, sizes, batch, grad_accum, hw, rules=None) -> None:
    """Raise SpmdError (naming the culprit) if this layout cannot run the model."""
    from spmd.train.step import check_batch

    if sizes["tensor"] > hw.devices_per_node or hw.devices_per_node % sizes["tensor"]:
        raise SpmdError(
            f"tensor={sizes['tensor']} does not fit in one {hw.name} node of "
            f"{hw.devices_per_node} devices"
        )
    mesh = abstract_mesh(sizes)
    for spec in jax.tree.leaves(model.specs(), is_leaf=P.is_spec):
        logical_to_spec(spec.axes, mesh, rules, spec.shape)
    check_batch(batch, grad_accum, mesh, rules)


def enumerate_candidates(
    model: Model, devices: int, hw: cost.Hardware, batch: int, remats, grad_accums, rules=None
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    ok, rejected = [], []
    for factors in _factorisations(devices, len(SEARCH_AXES)):
        sizes = {a: 1 for a in MESH_AXES} | dict(zip(SEARCH_AXES, factors, strict=True))
        for ga in grad_accums:
            try:
                check_candidate(model, sizes, batch, ga, hw, rules)
            except SpmdError as e:
                rejected.append((MeshConfig(**sizes).spec(), str(e)))
                continue
            ok += [Candidate(tuple(sizes.items()), r, ga) for r in remats]
    return ok, rejected


# --- Compile cache -------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("SPMD_CACHE_DIR") or Path.home() / ".cache" / "spmd") / "compile"


@functools.cache
def _source_hash() -> str:
    """Any change to spmd's code invalidates cached compiles."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cache_key(model: Model, c: Candidate, batch, seq, rules) -> str:
    blob = json.dumps(
        [
            model.name,
            repr(model.cfg),
            c.mesh,
            c.grad_accum,
            batch,
            seq,
            repr(rules),
            jax.__version__,
            _source_hash(),
        ],  # fmt: skip
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compiled_stats(model: Model, c: Candidate, batch, seq, rules=None, use_cache=True):
    """CompiledStats for a candidate, from the disk cache or a fresh ahead-of-time compile."""
    from spmd.mesh import make_mesh

    path = cache_dir() / f"{_cache_key(model, c, batch, seq, rules)}.json"
    if use_cache and path.exists():
        try:
            return report.CompiledStats.from_json(json.loads(path.read_text())), True
        except (ValueError, KeyError, TypeError):
            pass  # a stale or torn entry: compile again
    stats = report.compile_stats(model, make_mesh(c.sizes), batch, seq, c.grad_accum, rules)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(stats.to_json()))
        tmp.replace(path)
    return stats, False


# --- The search ----------------------------------------------------------------------------


def plan(
    model_name: str,
    devices: int,
    hardware: str = "cpu",
    batch: int | None = None,
    seq: int = 128,
    dtype: str = "float32",
    overrides: Mapping | None = None,
    remats: Sequence[str] = REMATS,
    grad_accums: Sequence[int] | None = None,
    compile_top: int = 3,
    max_compiles: int = 8,
    method: str = "auto",
    use_cache: bool = True,
    progress: bool = True,
    rules: Rules | None = None,
) -> Plan:
    t0 = time.perf_counter()
    hw = cost.get_hardware(hardware)
    batch = batch or report.default_batch(devices)
    grad_accums = grad_accums or [ga for ga in (1, 2, 4, 8) if batch % ga == 0]
    models = {r: report.build_model(model_name, overrides, r, dtype, seq) for r in remats}
    cands, rejected = enumerate_candidates(
        models[remats[0]], devices, hw, batch, remats, grad_accums, rules
    )
    if not cands:
        why = rejected[0][1] if rejected else "no factorisation"
        raise SpmdError(f"no layout of {devices} devices can run {model_name}: {why}")
    fitting = _prefilter(model_name, models, cands, batch, seq, hw, dtype, rules)
    calib = _Calibration(models, rules)
    compiled: list[Scored] = []
    why = _why_not_compile(method, devices)
    if not why:
        if progress:
            print(f"{model_name} on {devices} x {hw.name}: {len(cands)} candidates, "
                  f"{len(fitting)} fit the analytic estimate; compiling the most promising",
                  file=sys.stderr, flush=True)  # fmt: skip
        compiled = _compile_best(
            fitting, batch, seq, hw, calib, compile_top, max_compiles, use_cache, progress
        )
        why = f"compiled the {len(compiled)} best of the analytic ranking"
    ranked = sorted((s for s in compiled if s.fits), key=_rank_key)
    if compiled and not ranked:
        smallest = min(s.memory_bytes for s in compiled) / 1e9
        raise SpmdError(
            f"{model_name} fits no plan on {devices} x {hw.name}: none of the {len(compiled)} "
            f"most promising layouts fits once compiled (smallest: {smallest:,.1f} GB/device)"
        )
    seen = {s.candidate for s in compiled}
    ranked += [
        Scored(c, "analytic", mem, True, pred)
        for c, mem, pred in fitting
        if c not in seen and calib.corrected(c, mem) <= hw.capacity_bytes
    ]
    if not ranked:
        raise SpmdError(f"{model_name} fits no plan on {devices} x {hw.name}")
    return Plan(model_name, devices, hw, batch, seq, ranked[0].method, why, ranked, len(cands),
                len(fitting), len(compiled), time.perf_counter() - t0)  # fmt: skip


def _prefilter(model_name, models, cands, batch, seq, hw, dtype, rules):
    """The candidates the analytic estimate puts within memory (with slack), fastest first."""
    estimates = [
        (c, *analytic_estimate(models[c.remat], c, batch, seq, hw, dtype, rules)) for c in cands
    ]
    fitting = [e for e in estimates if e[1] <= hw.capacity_bytes * ANALYTIC_SLACK]
    if not fitting:
        c, mem, _ = min(estimates, key=lambda e: e[1])
        raise SpmdError(
            f"{model_name} fits no plan on {math.prod(c.sizes.values())} x "
            f"{hw.name}: the smallest layout ({c.label()}) needs about {mem / 1e9:,.1f} GB per "
            f"device, and a {hw.name} has {hw.hbm_bytes / 1e9:,.0f} GB; use more devices or "
            "a smaller --batch/--seq"
        )
    # Fastest first; among equals, the one that recomputes least, then the smallest.
    return sorted(fitting, key=lambda e: (round(e[2].step_time_s, 9), e[2].flops_s, e[1]))


def _rank_key(s: Scored):
    # Faster first; between equally fast plans (communication-bound ones hide any compute),
    # the one that recomputes least, then the one with more memory to spare.
    return (round(s.prediction.step_time_s, 9), s.prediction.flops_s, s.memory_bytes)


def _why_not_compile(method: str, devices: int) -> str:
    """Empty if the candidates can be compiled, else why the analytic estimate decides."""
    if method == "analytic":
        return "--method analytic"
    if devices > SIMULATION_LIMIT:
        if method == "compile":
            raise SpmdError(f"cannot simulate {devices} devices (the limit is {SIMULATION_LIMIT})")
        return f"{devices} devices is over the simulation limit of {SIMULATION_LIMIT}"
    if jax.device_count() != devices:
        if method == "compile":
            raise SpmdError(
                f"cannot compile for {devices} devices: JAX runs {jax.device_count()}; "
                f"pass --devices {devices}"
            )
        return f"JAX runs {jax.device_count()} devices, not {devices}"
    return ""


class _Calibration:
    """Scales the analytic activation memory by the worst compiled/estimated ratio seen."""

    def __init__(self, models, rules):
        self.models, self.rules, self.ratio = models, rules, 1.0

    def state(self, c: Candidate) -> float:
        # float32 parameters, two Adam moments and the gradients: exact, never scaled
        return 4 * _param_bytes(self.models[c.remat], c.sizes, self.rules)

    def corrected(self, c: Candidate, estimate: float) -> float:
        state = self.state(c)
        return state + max(estimate - state, 0.0) * self.ratio

    def update(self, c: Candidate, estimate: float, compiled: float) -> None:
        state = self.state(c)
        self.ratio = max(self.ratio, (compiled - state) / max(estimate - state, 1.0))


def _compile_best(fitting, batch, seq, hw, calib, want, max_compiles, use_cache, progress):
    """Compile candidates in analytic order until `want` fit or `max_compiles` ran. Each
    compile calibrates the analytic memory model, and a candidate whose calibrated estimate
    exceeds memory is skipped unbuilt."""
    out: list[Scored] = []
    for c, estimate, _ in fitting:
        if sum(s.fits for s in out) >= want or len(out) >= max_compiles:
            break
        # Before any compile the estimate gets some slack; after, it is calibrated instead.
        limit = hw.capacity_bytes * (1.0 if out else ANALYTIC_SLACK)
        if calib.corrected(c, estimate) > limit:
            continue
        if progress:
            print(f"  compiling {len(out) + 1}/{max_compiles} (at most): {c.label()} ...",
                  end="", file=sys.stderr, flush=True)  # fmt: skip
        t = time.perf_counter()
        model = calib.models[c.remat]
        stats, cached = compiled_stats(model, c, batch, seq, calib.rules, use_cache)
        rep = report.make_report(
            model, abstract_mesh(c.sizes), batch, seq, c.grad_accum, hw, stats, calib.rules
        )
        s = Scored(c, "compiled", stats.memory["total_bytes"], rep.fits, rep.prediction, rep)
        out.append(s)
        calib.update(c, estimate, s.memory_bytes)
        if progress:
            how = "cached" if cached else f"{time.perf_counter() - t:.0f}s"
            verdict = "fits" if s.fits else "does not fit"
            step = report.fmt_time(s.prediction.step_time_s)
            mem = report.fmt_bytes(s.memory_bytes)
            print(f" {how}, {mem}/device, {verdict}, step {step}", file=sys.stderr, flush=True)
    return out


def plan_mesh_for_train(
    model_name, overrides, batch, seq, remat, grad_accum, dtype, rules=None, compile_top=3
) -> str:
    """`spmd train --mesh auto`: the best mesh for the devices JAX sees, keeping the run's
    remat and grad-accum, scored on the hardware JAX runs on."""
    hardware = cost.detect_hardware()
    p = plan(
        model_name,
        jax.device_count(),
        hardware,
        batch,
        seq,
        dtype,
        overrides,
        remats=(remat,),
        grad_accums=(grad_accum,),
        compile_top=compile_top,
        rules=rules,
    )
    best = p.best
    print(
        f"--mesh auto: {best.candidate.spec} (planner, {best.method} on {hardware}, "
        f"{p.n_candidates} candidates, {p.wall_s:.0f}s)",
        flush=True,
    )
    return best.candidate.spec
