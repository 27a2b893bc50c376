"""The compiler report: what XLA will do with a model on a mesh, before a step runs.

`compile_stats` compiles the real train step (`spmd.compiler.program.TrainProgram`, the
trainer's own path) on abstract inputs, so nothing is allocated, and reads from the
compiled program:
  - memory, from `compiled.memory_analysis()`, with the arguments split by pytree path
    into parameters, optimizer state and batch;
  - FLOPs, from `compiled.cost_analysis()`; XLA counts a loop body once, so the FLOPs of
    the matmuls in loop bodies (the scanned layers) are added for the other iterations;
  - every collective, from `compiled.as_text()` (spmd.compiler.hlo).
`Report` adds the hardware: whether it fits, and the predicted step time and MFU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import jax
import numpy as np

from spmd import params as param_lib
from spmd.compiler import cost, hlo, kernels
from spmd.compiler.program import CompiledStep, TrainProgram, build_model
from spmd.compiler.program_cost import program_cost
from spmd.layout import Layout
from spmd.models import Model
from spmd.parallel import local_sgd
from spmd.parallel.local_sgd import LocalSGDConfig
from spmd.rules import Rules


def default_batch(n_devices: int) -> int:
    """Without --batch, one sequence per device (and at least 8)."""
    return max(8, n_devices)


@dataclasses.dataclass
class CompiledStats:
    """Everything read from one compile; independent of the hardware, so it can be cached."""

    memory: dict
    flops_per_device: float  # XLA's count, loop bodies counted as often as they run
    xla_flops_raw: float  # cost_analysis()["flops"] as XLA reports it (loop bodies once)
    matmul_flops_per_device: float  # dots and convolutions only, loops x trip count
    bytes_per_device: float
    collectives: list[hlo.Collective]
    compile_s: float

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["collectives"] = [c.to_json() for c in self.collectives]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> CompiledStats:
        d = dict(d)
        d["collectives"] = [hlo.Collective.from_json(c) for c in d["collectives"]]
        return cls(**d)


def compile_stats(program: TrainProgram, hlo_path: str | None = None) -> CompiledStats:
    return stats_from_compiled(program.compile(), hlo_path)


def stats_from_compiled(compiled: CompiledStep, hlo_path: str | None = None) -> CompiledStats:
    program, executable = compiled.program, compiled.executable
    text = executable.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    module = hlo.parse_module(text)
    cost_of_program = program_cost(module)
    xla = _cost_analysis(executable)
    # XLA counts each loop body once; add the other iterations' matmuls and bytes.
    extra_flops = cost_of_program.dot_flops - cost_of_program.dot_flops_once
    extra_bytes = cost_of_program.bytes_accessed - cost_of_program.bytes_accessed_once
    return CompiledStats(
        memory=_memory(executable.memory_analysis(), program),
        flops_per_device=xla.get("flops", 0.0) + extra_flops,
        xla_flops_raw=xla.get("flops", 0.0),
        matmul_flops_per_device=cost_of_program.dot_flops,
        bytes_per_device=xla.get("bytes accessed", 0.0) + extra_bytes,
        collectives=hlo.collectives(module, program.layout.shape),
        compile_s=compiled.compile_s,
    )


def _cost_analysis(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):  # older JAX: one dict per program
        ca = ca[0] if ca else {}
    return dict(ca or {})


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (shard shapes)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _memory(ma, program: TrainProgram) -> dict:
    args, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    code = int(getattr(ma, "generated_code_size_in_bytes", 0))
    params = per_device_bytes(program.abstract_state.params)
    opt_state = per_device_bytes(program.abstract_state.opt_state)
    batch = per_device_bytes(program.abstract_batch)
    return {
        "arguments_bytes": args,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "code_bytes": code,
        # Donated state: outputs that alias arguments take no new memory.
        "total_bytes": args + temp + max(out - alias, 0) + code,
        "params_bytes": params,
        "opt_state_bytes": opt_state,
        "batch_bytes": batch,
        "other_arguments_bytes": max(args - params - opt_state - batch, 0),
    }


def param_rows(model: Model, layout: Layout) -> list[dict]:
    """Every parameter: path, shape, logical axes, PartitionSpec, per-device shape."""
    sizes = layout.shape
    rows = []
    leaves = jax.tree_util.tree_flatten_with_path(model.specs(), is_leaf=param_lib.is_spec)[0]
    for path, spec in leaves:
        pspec = layout.pspec(spec.axes, spec.shape)
        local = list(spec.shape)
        for dim, entry in enumerate(pspec):
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                local[dim] //= sizes[axis]
        rows.append(
            {
                "name": "/".join(str(getattr(k, "key", k)) for k in path),
                "shape": list(spec.shape),
                "logical": [_logical_str(a) for a in spec.axes],
                "spec": _spec_str(pspec),
                "per_device_shape": local,
                "bytes": math.prod(spec.shape) * np.dtype(spec.dtype).itemsize,
            }
        )
    return sorted(rows, key=lambda r: -r["bytes"])


def _logical_str(a) -> str:
    return "*".join(a) if isinstance(a, tuple) else str(a)


def _spec_str(pspec) -> str:
    def entry(e):
        if e is None:
            return "None"
        return repr(e) if isinstance(e, str) else "(" + ", ".join(map(repr, e)) + ")"

    return "P(" + ", ".join(entry(e) for e in pspec) + ")"


@dataclasses.dataclass
class Report:
    model: str
    params: int
    mesh: dict[str, int]
    devices: int
    batch: int
    seq: int
    grad_accum: int
    remat: str
    dtype: str
    hardware: cost.Hardware
    stats: CompiledStats
    model_flops_per_step: float
    param_rows: list[dict]
    method: str = "compiled"
    cfg: object = None  # the model's config, for the kernel split (None: not a transformer)
    pipeline: dict | None = None  # the schedule over `stage` and its bubble (None: no stage)
    local_sgd: dict | None = None  # under --local-steps: see `local_sgd_comm`

    @property
    def comm_items(self) -> list[cost.CommItem]:
        return [
            cost.CommItem(c.kind, c.bytes * self.wire_scale(c), c.count, c.group_size,
                          c.group, c.axes)
            for c in self.stats.collectives
        ]  # fmt: skip

    def wire_scale(self, c: hlo.Collective) -> float:
        """Bytes an accelerator moves per byte in the XLA:CPU program. XLA:CPU carries every
        bfloat16 collective in float32 (every collective of a bf16 gpt-tiny step on
        fsdp=4,tensor=2 reads `f32` in its HLO). In a bf16 run the layer loop's traffic is
        bf16 on a GPU or TPU: weights are cast before they are gathered
        (`spmd.models.gpt.in_compute_dtype`), their gradients come back through the cast, and
        activations are bf16. So collectives run once per layer or more move half the bytes;
        the rest (embedding, float32 head, norm scales, the loss) are float32 anyway."""
        hw, layers = self.hardware, getattr(self.cfg, "n_layers", 0)
        bf16_on_chip = self.dtype == "bfloat16" and hw.peak_dtype == "bfloat16"
        in_layer_loop = layers > 1 and c.count >= layers
        return 0.5 if bf16_on_chip and in_layer_loop else 1.0

    @property
    def prediction(self) -> cost.Prediction:
        return cost.predict(
            self.hardware,
            self.stats.flops_per_device,
            self.stats.bytes_per_device,
            self.comm_items,
            self.model_flops_per_step,
            self.batch * self.seq,
            self.devices,
            self.kernels,
        )

    @property
    def kernels(self) -> cost.Kernels | None:
        if not hasattr(self.cfg, "dims") or self.hardware.memory_in_roofline:
            return None
        m = self.mesh
        shards = m["data"] * m["fsdp"] * m["expert"] * m["sequence"] * m["stage"]
        tokens = self.batch * self.seq / shards
        flops = self.stats.flops_per_device
        return kernels.transformer_kernels(
            self.cfg, self.hardware, tokens, self.seq, m["tensor"], flops
        )

    @property
    def fits(self) -> bool:
        return self.stats.memory["total_bytes"] <= self.hardware.capacity_bytes

    def collective_groups(self) -> list[dict]:
        """Collectives summed by (kind, mesh axes): count, bytes per step and ring time."""
        groups: dict[tuple, dict] = {}
        for c, item in zip(self.stats.collectives, self.comm_items, strict=True):
            key = (c.kind, c.axes)
            g = groups.setdefault(
                key,
                {
                    "kind": c.kind,
                    "axes": list(c.axes),
                    "count": 0,
                    "bytes": 0,
                    "time_s": 0.0,
                    "group_size": c.group_size,
                    "raw_kinds": set(),
                },
            )
            g["count"] += c.count
            g["bytes"] += item.count * item.nbytes  # on the wire: bf16 where the chip moves it
            g["time_s"] += item.time(self.hardware)
            g["raw_kinds"].add(c.raw_kind)
        out = sorted(groups.values(), key=lambda g: -g["bytes"])
        for g in out:
            g["raw_kinds"] = sorted(g["raw_kinds"])
            g["count"] = int(round(g["count"]))
            g["bytes"] = int(round(g["bytes"]))
        return out

    def to_json(self) -> dict:
        mem = dict(self.stats.memory)
        mem.update(capacity_bytes=self.hardware.capacity_bytes, fits=self.fits)
        return {
            "model": self.model,
            "params": self.params,
            "mesh": self.mesh,
            "devices": self.devices,
            "batch": self.batch,
            "seq": self.seq,
            "grad_accum": self.grad_accum,
            "remat": self.remat,
            "dtype": self.dtype,
            "hardware": self.hardware.name,
            "method": self.method,
            "memory": mem,
            "flops_per_device": self.stats.flops_per_device,
            "xla_flops_raw": self.stats.xla_flops_raw,
            "matmul_flops_per_device": self.stats.matmul_flops_per_device,
            "bytes_per_device": self.stats.bytes_per_device,
            "model_flops_per_step": self.model_flops_per_step,
            "collectives": self.collective_groups(),
            "predicted": self.prediction.to_json(),
            "pipeline": self.pipeline,
            "largest_params": self.param_rows[:10],
            "compile_s": self.stats.compile_s,
            "local_sgd": self.local_sgd,
        }


def explain(
    model: str,
    mesh: str = "data=-1",
    batch: int | None = None,
    seq: int = 128,
    hardware: str = "cpu",
    remat: str | None = None,
    grad_accum: int = 1,
    dtype: str | None = None,
    overrides: Mapping | None = None,
    rules: Rules | None = None,
    hlo_path: str | None = None,
    attention: str | None = None,
    context_parallel: str | None = None,
    pipeline=None,
    local_steps: int | None = None,
) -> Report:
    """Compile the train step for `model` on `mesh` (all of JAX's devices) and report it.
    `pipeline`: a PipelineConfig for a mesh with `stage` (None: its defaults)."""
    hw = cost.get_hardware(hardware)  # fail on a bad name before compiling anything
    m = build_model(
        model, overrides, remat=remat, dtype=dtype, attention=attention, seq=seq,
        context_parallel=context_parallel,
    )  # fmt: skip
    layout = Layout.make(mesh, rules)
    batch = batch or default_batch(layout.devices)
    local = LocalSGDConfig(local_steps) if local_steps is not None else None
    program = TrainProgram.for_tokens(
        m, layout, batch, seq, grad_accum=grad_accum, pipeline=pipeline, local=local
    )
    compiled = program.compile()
    report = make_report(program, hw, stats_from_compiled(compiled, hlo_path))
    if local:
        report.local_sgd = local_sgd_comm(compiled)
    return report


def local_sgd_comm(compiled: CompiledStep) -> dict:
    """Bytes per device over the workers' mesh axes: the inner step's (none, by design), the
    sync step's, and their average per step when one step in H is a sync step."""
    program, every = compiled.program, compiled.program.local.local_steps
    axes = local_sgd.worker_axes(program.layout)
    sync = dataclasses.replace(compiled, executable=compiled.sync)
    inner_bytes, sync_bytes = (
        hlo.bytes_over(hlo.collectives(c.executable.as_text(), program.layout.shape), axes)
        for c in (compiled, sync)
    )
    return {
        "local_steps": every,
        "axes": list(axes),
        "inner_step_bytes": inner_bytes,
        "sync_step_bytes": sync_bytes,
        "bytes_per_step": ((every - 1) * inner_bytes + sync_bytes) / every,
    }


def make_report(program: TrainProgram, hw: cost.Hardware, stats: CompiledStats) -> Report:
    """The program's layout may be abstract (axis sizes only): nothing runs here."""
    m, layout = program.model, program.layout
    batch, seq = program.shapes["inputs"]
    return Report(
        model=m.name,
        params=m.n_params,
        mesh=layout.shape,
        devices=layout.devices,
        batch=batch,
        seq=seq,
        grad_accum=program.grad_accum,
        remat=getattr(m.cfg, "remat", "none"),
        dtype=getattr(m.cfg, "compute_dtype", "float32"),
        hardware=hw,
        stats=stats,
        model_flops_per_step=cost.model_flops_per_step(m, batch, seq),
        param_rows=param_rows(m, layout),
        cfg=m.cfg,
        pipeline=pipeline_summary(program),
    )


def pipeline_summary(program: TrainProgram) -> dict | None:
    """The schedule the program runs over `stage`, with its bubble: the fraction of each
    stage's time spent idle, (S-1)/(V*M+S-1)."""
    pipe = program.pipe
    if pipe is None:
        return None
    stages = program.layout.shape["stage"]
    return {
        "schedule": pipe.schedule,
        "stages": stages,
        "microbatches": pipe.microbatches,
        "virtual_stages": pipe.virtual_stages,
        "ticks": pipe.ticks(stages),
        "bubble": pipe.bubble(stages),
    }


def dumps(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2, default=_json_default)


def _json_default(x):
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, set | tuple):
        return list(x)
    raise TypeError(type(x))
