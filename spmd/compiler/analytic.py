"""The planner's analytic estimate: memory, traffic and collectives from shapes alone.

Parameter and optimizer shards are exact (they come from the rules). Activations, memory
traffic and collectives follow spmd.models.gpt's structure and were calibrated against
compiles of gpt-small and llama-7b; the planner re-calibrates activations on every compile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from spmd import params as param_lib
from spmd.compiler import cost, kernels
from spmd.compiler.candidates import Candidate
from spmd.layout import Layout
from spmd.mesh import MESH_AXES
from spmd.models import Model, gpt


def param_bytes(model: Model, sizes, rules=None) -> float:
    """Bytes of one device's parameter shards (as stored) on a mesh of these sizes."""
    layout = Layout.abstract(sizes, rules)
    total = 0
    for spec in jax.tree.leaves(model.specs(), is_leaf=param_lib.is_spec):
        pspec = layout.pspec(spec.axes, spec.shape)
        split = 1
        for entry in pspec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                split *= sizes[axis]
        total += math.prod(spec.shape) * np.dtype(spec.dtype).itemsize / split
    return total


def axis_group(sizes: Mapping[str, int], axes: Sequence[str]) -> tuple[int, ...]:
    """The device ids (mesh order) of the group through device 0 along `axes`."""
    shape = [sizes[a] for a in MESH_AXES]
    index = tuple(slice(None) if a in axes else 0 for a in MESH_AXES)
    return tuple(np.arange(math.prod(shape)).reshape(shape)[index].reshape(-1).tolist())


def analytic_estimate(model: Model, c: Candidate, batch: int, seq: int, hw, dtype, rules=None):
    """(memory bytes per device, Prediction) from the model's shapes alone (llama-style).

    Parameter and optimizer shards are exact; activations, traffic and collectives follow
    spmd.models.gpt's structure, calibrated against compiles of gpt-small and llama-7b."""
    s = c.sizes
    shards = c.layout(rules).batch_shards
    m = c.microbatches or 1  # pipeline microbatches (1F1B over `stage`)
    n = batch // c.grad_accum // shards * seq // m  # tokens per device per microbatch
    cb = 2 if dtype == "bfloat16" else 4
    params = param_bytes(model, s, rules)  # float32 shards, as stored
    gathered = param_bytes(model, s | {"fsdp": 1, "data": 1}, rules)  # after FSDP gathers
    cfg = _stage_cfg(model.cfg, s["stage"])  # the layers one device runs
    memory = _analytic_memory(cfg, s, c.remat, n, seq, cb, params, gathered)
    memory += 2 * 4 * batch * seq / shards  # inputs and targets
    memory += (2 * s["stage"] - 1) * n * cfg.d_model * cb if m > 1 else 0  # 1F1B's stash
    work = pipeline_work(s["stage"], m)
    traffic = _analytic_bytes(cfg, s, c, n * m, seq, cb, params, gathered) * work
    comm = _analytic_comm(model, s, c, n, cb, params, gathered, rules)
    # `attention` recomputes the MLP forward, about two thirds of a llama layer's matmuls.
    recompute = {"none": 1.0, "dots": 1.05, "full": 4 / 3, "attention": 1 + 2 / 9}[c.remat]
    flops = cost.model_flops_per_step(model, batch, seq, causal=False) * recompute / _n(s)
    flops *= work
    split = None
    if not hw.memory_in_roofline:
        tokens = batch * seq / (shards * s["sequence"] * s["stage"])
        split = kernels.transformer_kernels(model.cfg, hw, tokens, seq, s["tensor"], flops)
    model_flops = cost.model_flops_per_step(model, batch, seq)
    pred = cost.predict(hw, flops, traffic, comm, model_flops, batch * seq, _n(s), split)
    return memory, pred


def knows(model: Model) -> bool:
    """Whether `analytic_estimate` can model this model's activations and traffic: it follows
    gpt's blocks (MoE's config is a GPTConfig too). Any other model (a Flax module) gets
    `parameter_estimate`, and the planner compiles to learn the rest."""
    return isinstance(model.cfg, gpt.GPTConfig)


def parameter_estimate(model: Model, c: Candidate, batch: int, seq: int, hw, dtype, rules=None):
    """(memory bytes per device, Prediction) for a model of unknown structure: only what the
    ParamSpecs and the layout determine. Memory is the float32 parameter shards, their
    gradients and two Adam moments, plus the token batch: activations are not counted (a
    lower bound). Compute is 6 N FLOPs per token over all devices. Communication is the
    parameters' own (FSDP gathers and reduce-scatters, the data-parallel all-reduce) and a
    guess at tensor parallelism's from the logical axes: Megatron's pattern, one all-reduce
    of the `embed`-wide activations forward and one backward per pair of tensor-split
    weights that touch `embed`. The module's code may differ; a compile measures it."""
    s = c.sizes
    shards = c.layout(rules).batch_shards
    cb = 2 if dtype == "bfloat16" else 4
    n = batch // c.grad_accum // shards * seq  # tokens per device per microstep
    params = param_bytes(model, s, rules)
    gathered = param_bytes(model, s | {"fsdp": 1, "data": 1}, rules)
    memory = 4 * params + 2 * 4 * batch * seq / shards
    model_flops = 6.0 * model.n_params * batch * seq
    traffic = c.grad_accum * 5 * gathered + 45 * params  # as in gpt's fit, minus activations
    ga, items = c.grad_accum, []
    pairs = _tensor_split(model, s, rules) // 2
    for kind, nbytes, count, axis in (
        ("all-gather", gathered * cb / 4, 2 * ga, "fsdp"),  # forward and backward
        ("reduce-scatter", gathered * cb / 4, ga, "fsdp"),
        ("all-reduce", params * cb / 4, ga, "data"),
        ("all-reduce", n * _embed_width(model) * cb, 2 * pairs * ga, "tensor"),
    ):
        if s[axis] > 1 and count:
            group = axis_group(s, (axis,))
            items.append(cost.CommItem(kind, nbytes, count, s[axis], group, (axis,)))
    pred = cost.predict(hw, model_flops / _n(s), traffic, items, model_flops, batch * seq, _n(s))
    return memory, pred


def _embed_width(model: Model) -> int:
    """The residual stream's width: the largest dimension a parameter names `embed`."""
    dims = [
        d
        for spec in jax.tree.leaves(model.specs(), is_leaf=param_lib.is_spec)
        for d, name in zip(spec.shape, spec.axes, strict=True)
        if name == "embed"
    ]
    return max(dims, default=0)


def _tensor_split(model: Model, sizes, rules) -> int:
    """How many weights touching `embed` (not the vocabulary's) `tensor` splits here."""
    layout = Layout.abstract(sizes, rules)
    count = 0
    for spec in jax.tree.leaves(model.specs(), is_leaf=param_lib.is_spec):
        if "embed" not in spec.axes or "vocab" in spec.axes:
            continue
        pspec = layout.pspec(spec.axes, spec.shape)
        axes = [a for e in pspec for a in ((e,) if isinstance(e, str) else e or ())]
        count += "tensor" in axes
    return count


def pipeline_work(stages: int, m: int) -> float:
    """Each device's compute under 1F1B over an ideal split of the step. The loop runs
    M+S-1 forward and M+S-1 backward ticks (the bubble), and a backward recomputes its
    stage's forward (2F + B, with B = 2F: 4/3 of F + B)."""
    if stages == 1:
        return 1.0
    return 4 * (m + stages - 1) / (3 * m)


def _stage_cfg(cfg, stages: int):
    return dataclasses.replace(cfg, n_layers=cfg.n_layers // stages) if stages > 1 else cfg


def _analytic_memory(cfg, s, remat, n, seq, cb, params, gathered) -> float:
    d, h, g, k, f, v, L = cfg.dims
    T = s["tensor"]
    # What one layer keeps for its backward pass, per token: the residual stream and norms,
    # q/k/v before and after rotary, the attention output, SwiGLU's gate/up/hidden, and the
    # float32 scores and probabilities (h x seq).
    layer = 6 * d * cb + (3 * h * k + 3 * g * k + 4 * f) / T * cb + 2 * h / T * seq * 4
    if remat == "full":
        saved = L * n * d * cb + n * layer
    elif remat == "dots":
        saved = L * n * ((h * k + 2 * g * k + 2 * f) / T * cb + 2 * d * cb) + n * layer
    elif remat == "attention":  # q, k, v and the attention output, and the layer's input
        saved = L * n * ((2 * h * k + 2 * g * k) / T * cb + d * cb) + n * layer
    else:
        saved = L * n * layer
    logits = 3 * n * v / T * 4
    embed = 2 * v * d * 4 / T  # the table is gathered whole for the lookup, and its grad
    weights = 2 * gathered / L if s["fsdp"] > 1 else 0.0  # one layer gathered, double-buffered
    # parameters, two Adam moments and the gradients, all float32 shards
    return 4 * params + saved + logits + embed + weights


def _analytic_bytes(cfg, s, c, n, seq, cb, params, gathered) -> float:
    """Memory traffic per device per step, fitted to XLA:CPU programs (used by `cpu` only)."""
    d, h, g, k, f, v, L = cfg.dims
    T = s["tensor"]
    per_token_layer = cb * (150 * d + (75 * f + 45 * (h * k + 2 * g * k)) / T) + 48 * h / T * seq
    activations = c.grad_accum * L * n * per_token_layer
    # The optimizer update is unfused on CPU: ~45 passes over the float32 shards.
    return activations + c.grad_accum * 5 * gathered + 45 * params + 8 * c.grad_accum * n * v / T


def _n(sizes) -> int:
    return math.prod(sizes.values())


def _analytic_comm(model, s, c, n, cb, params, gathered, rules) -> list[cost.CommItem]:
    d, L, v, ga = model.cfg.d_model, model.cfg.n_layers, model.cfg.vocab_size, c.grad_accum
    stages, m = s["stage"], c.microbatches or 1
    L //= stages  # the layers one device holds and runs
    # A pipeline runs its layers once per tick: M+S-1 forward ticks and as many backward
    # ticks, each of which recomputes the forward first (spmd/parallel/one_f_one_b.py).
    passes = m + stages - 1 if stages > 1 else 1
    forwards = 2 if stages > 1 else 1
    layer_weights = sum(
        1
        for spec in jax.tree.leaves(model.specs(), is_leaf=param_lib.is_spec)
        if "layers" in spec.axes and "embed" in spec.axes
    )
    items = []

    def add(kind, nbytes, count, axes):
        axes = tuple(a for a in axes if s[a] > 1)
        if axes and count:
            size = math.prod(s[a] for a in axes)
            items.append(cost.CommItem(kind, nbytes, count, size, axis_group(s, axes), axes))

    # FSDP: each layer weight is gathered for the forward pass and again for the backward
    # pass; each layer's gradients are reduce-scattered in one combined op, per microbatch.
    # Both move the compute dtype: the weights are cast before the gather and the gradients
    # come back through the cast (spmd.models.gpt.in_compute_dtype); `gathered` is float32.
    wire = gathered * cb / 4
    per_weight = wire / L / max(layer_weights, 1)
    add("all-gather", per_weight, (1 + forwards) * passes * L * layer_weights * ga, ("fsdp",))
    add("reduce-scatter", wire / L, passes * L * ga, ("fsdp",))
    # Data parallel: all-reduce the (FSDP/TP-sharded) gradients of each layer.
    add("all-reduce", params * cb / 4 / L, L * ga, ("data",))  # through the cast too
    # Tensor parallel: two activation all-reduces per layer forward, two backward (and the
    # forward's again when it is recomputed).
    tp = 6 if c.remat == "full" or stages > 1 else 4
    add("all-reduce", n * d * cb, tp * passes * L * ga, ("tensor",))
    # The embedding table, gathered whole for the lookup, and its dense gradient.
    add("all-gather", v * d * 4, passes * ga, ("fsdp", "tensor"))
    add("all-reduce", v * d * 4, 1, ("data", "fsdp", "tensor"))
    # The pipeline: a microbatch's activations to the next stage each forward tick and its
    # cotangents back each backward tick; the embedding's and head's gradients, which only
    # the first and last stage compute, summed over `stage` once.
    add("collective-permute", n * d * cb, 2 * passes * ga, ("stage",))
    add("all-reduce", 2 * v * d * 4, ga if stages > 1 else 0, ("stage",))
    return items
