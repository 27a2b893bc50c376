"""The automatic planner: search mesh layouts, remat policies and grad-accum counts.

1. Enumerate (`candidates.py`): every factorisation of the devices that divides every
   parameter and the (micro)batch (the same checks the train step makes: SpmdError), with
   `tensor` inside one node, times each remat policy and grad-accum count.
2. Pre-filter analytically: per-device memory (exact parameter/optimizer shards plus an
   activation model) and a roofline step time with ring-cost communication. Cheap.
3. Compile the best few ahead of time on simulated devices (as `spmd explain` does), drop
   those whose compiled program does not fit, rank the rest by predicted step time. Each
   compile calibrates the activation-memory estimate for the candidates still to come.
   Compiles are cached on disk (`$SPMD_CACHE_DIR`, default ~/.cache/spmd).
`plan` also takes a `Model` (a Flax module through spmd.interop.flax_adapter): its remat is
its own, and unless it is a gpt model the analytic estimate knows only its parameters
(`analytic.parameter_estimate`), so the compiled candidates are the ones to trust.
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

from spmd.compiler import analytic, cost, render, report
from spmd.compiler.analytic import analytic_estimate, param_bytes
from spmd.compiler.candidates import Candidate, enumerate_candidates
from spmd.compiler.program import TrainProgram, build_model
from spmd.errors import SpmdError
from spmd.layout import Layout
from spmd.models import Model
from spmd.rules import Rules

REMATS = ("none", "dots", "full")
SIMULATION_LIMIT = 512  # above this, compiling on simulated CPU devices gets slow
ANALYTIC_SLACK = 1.25  # compile candidates the analytic model puts up to 25% over memory
OWN_REMAT = "own"  # the remat label of a model whose recomputation is in its own code
GPT_ESTIMATE = (
    "memory (parameters, optimizer state, activations) and step time from gpt's structure"
)
PARAM_ESTIMATE = (
    "parameter, gradient and Adam-state bytes per device from the ParamSpecs and the layout, "
    "6N FLOPs per token, and tensor-parallel traffic guessed from the logical axes; "
    "activations are unknown until compiled"
)


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
            "microbatches": c.microbatches,
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
    dtype: str  # the compute dtype the plans were costed for
    method: str  # how the winner was scored
    why: str  # why that method
    ranked: list[Scored]  # fitting plans, best first
    n_candidates: int
    n_analytic_fit: int
    n_compiled: int
    wall_s: float
    estimate: str = GPT_ESTIMATE  # what the analytic estimate covers
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (mesh, why)

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
            "estimate": self.estimate,
            "wall_s": self.wall_s,
            "top": [s.to_json() for s in self.ranked[:top]],
        }


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
            c.microbatches,
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
    path = cache_dir() / f"{_cache_key(model, c, batch, seq, rules)}.json"
    if use_cache and path.exists():
        try:
            return report.CompiledStats.from_json(json.loads(path.read_text())), True
        except (ValueError, KeyError, TypeError):
            pass  # a stale or torn entry: compile again
    program = TrainProgram.for_tokens(
        model,
        Layout.make(c.sizes, rules),
        batch,
        seq,
        grad_accum=c.grad_accum,
        pipeline=c.pipeline(),
    )
    stats = report.compile_stats(program)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(stats.to_json()))
        tmp.replace(path)
    return stats, False


# --- The search ----------------------------------------------------------------------------


def plan(
    model: str | Model,
    devices: int,
    hardware: str = "cpu",
    batch: int | None = None,
    seq: int = 128,
    dtype: str | None = None,
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
    """Rank the layouts of `devices` for `model`: a preset name (searching remat too) or a
    `Model` as built (its own remat and dtype)."""
    t0 = time.perf_counter()
    hw = cost.get_hardware(hardware)
    batch = batch or report.default_batch(devices)
    grad_accums = grad_accums or [ga for ga in (1, 2, 4, 8) if batch % ga == 0]
    if isinstance(model, Model):
        models = _own_model(model, overrides, dtype)
    else:
        models = _models_by_remat(model, overrides, remats, dtype, seq)
    first = next(iter(models.values()))
    model_name, known = first.name, analytic.knows(first)
    # A module's code is not in its cfg's repr, so the disk cache could not tell two apart.
    use_cache = use_cache and known
    dtype = getattr(first.cfg, "compute_dtype", "float32")
    cands, rejected = enumerate_candidates(
        first, devices, hw, batch, list(models), grad_accums, rules
    )
    if not cands:
        why = rejected[0][1] if rejected else "no factorisation"
        raise SpmdError(f"no layout of {devices} devices can run {model_name}: {why}")
    estimate = analytic_estimate if known else analytic.parameter_estimate
    fitting = _prefilter(model_name, models, cands, batch, seq, hw, dtype, rules, estimate)
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
    return Plan(model_name, devices, hw, batch, seq, dtype, ranked[0].method, why, ranked,
                len(cands), len(fitting), len(compiled), time.perf_counter() - t0,
                GPT_ESTIMATE if known else PARAM_ESTIMATE, _distinct(rejected))  # fmt: skip


def _own_model(model: Model, overrides, dtype) -> dict[str, Model]:
    """A Model as built: its remat and dtype are its own, so only the layout is searched."""
    if overrides:
        raise SpmdError("overrides apply to a model preset by name, not to a built Model")
    own = getattr(model.cfg, "compute_dtype", None)
    if dtype is not None and dtype != own:
        raise SpmdError(f"dtype={dtype} cannot be applied to the built model {model.name!r}")
    return {getattr(model.cfg, "remat", OWN_REMAT): model}


def _distinct(rejected):
    """One reason per mesh (each grad-accum count repeats the parameters' verdict)."""
    first: dict[str, str] = {}
    for mesh, why in rejected:
        first.setdefault(mesh, why)
    return list(first.items())


def _models_by_remat(model_name, overrides, remats, dtype, seq) -> dict[str, Model]:
    """One model per remat policy searched; `--set remat=...` fixes the policy."""
    if overrides and "remat" in overrides:
        remats = (str(overrides["remat"]),)
    return {r: build_model(model_name, overrides, remat=r, dtype=dtype, seq=seq) for r in remats}


def _prefilter(model_name, models, cands, batch, seq, hw, dtype, rules, estimate):
    """The candidates the analytic estimate puts within memory (with slack), fastest first."""
    estimates = [(c, *estimate(models[c.remat], c, batch, seq, hw, dtype, rules)) for c in cands]
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
        return 4 * param_bytes(self.models[c.remat], c.sizes, self.rules)

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
        program = TrainProgram.for_tokens(
            model, c.layout(calib.rules), batch, seq, grad_accum=c.grad_accum,
            pipeline=c.pipeline(),
        )  # fmt: skip
        rep = report.make_report(program, hw, stats)
        s = Scored(c, "compiled", stats.memory["total_bytes"], rep.fits, rep.prediction, rep)
        out.append(s)
        calib.update(c, estimate, s.memory_bytes)
        if progress:
            how = "cached" if cached else f"{time.perf_counter() - t:.0f}s"
            verdict = "fits" if s.fits else "does not fit"
            step = render.fmt_time(s.prediction.step_time_s)
            mem = render.fmt_bytes(s.memory_bytes)
            print(f" {how}, {mem}/device, {verdict}, step {step}", file=sys.stderr, flush=True)
    return out


def plan_mesh_for_train(
    model_name, overrides, batch, seq, remat, grad_accum, dtype, rules=None, compile_top=3
) -> str:
    """`spmd train --mesh auto`: the best mesh for the devices JAX sees, keeping the run's
    remat and grad-accum (None: the model's own), scored on the hardware JAX runs on."""
    hardware = cost.detect_hardware()
    cfg = build_model(model_name, overrides, remat=remat, dtype=dtype, seq=seq).cfg
    p = plan(
        model_name,
        jax.device_count(),
        hardware,
        batch,
        seq,
        getattr(cfg, "compute_dtype", "float32"),
        overrides,
        remats=(getattr(cfg, "remat", "none"),),
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
