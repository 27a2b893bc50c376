"""`TrainConfig`: everything a training run is asked to do, as one frozen, typed value.

The `spmd train` flags are its fields (spmd/commands/train.py builds them from it), and the
checkpoint records it as JSON. It imports nothing heavy, so building the CLI stays fast.
"""

from __future__ import annotations

import dataclasses

from spmd.errors import SpmdError

# The choices of `--optimizer` and `--outer-optimizer` (checked again where they are built).
OPTIMIZERS = ("adamw", "sgd")
OUTER_OPTIMIZERS = ("avg", "nesterov")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "gpt-tiny"
    overrides: tuple[tuple[str, str], ...] = ()
    mesh: str = "data=-1"
    steps: int = 100
    batch: int = 8
    seq: int = 128
    grad_accum: int = 1
    remat: str | None = None  # None: the model's own (or `--set remat=...`)
    dtype: str | None = None  # None: the model's own compute_dtype
    attention: str | None = None  # None: the model's own (auto: chosen per backend)
    # Context parallelism on a `sequence` mesh axis: ring or allgather; None: the model's own.
    context_parallel: str | None = None
    lr: float = 1e-3
    warmup: int = 10
    schedule_steps: int | None = None  # the LR schedule's length; default: steps
    seed: int = 0
    data: str | None = None
    tokenizer: str | None = None
    metrics_file: str | None = None
    progress: bool = True
    eval_every: int | None = None
    eval_batches: int = 4
    tensorboard: str | None = None
    plot: str | None = None
    ckpt_dir: str | None = None
    ckpt_every: int = 100
    keep: int = 3
    resume: bool = False
    async_ckpt: bool = True
    # Fine-tuning (spmd/train/init_from.py): start from this checkpoint's weights and model.
    init_from: str | None = None
    # Pipeline parallelism over the mesh axis `stage` (spmd/parallel/pipeline.py). None: the
    # pipeline's defaults (gpipe, `stage` microbatches, V=2 for interleaved); any of them
    # given on a mesh without `stage` is refused.
    pipeline_schedule: str | None = None
    microbatches: int | None = None
    virtual_stages: int | None = None
    # Local SGD / DiLoCo (spmd/parallel/local_sgd.py): each `data` slice is a worker that
    # syncs every `local_steps` steps. `optimizer` is the (inner) optimizer: adamw or sgd.
    optimizer: str = "adamw"
    local_steps: int | None = None  # None: synchronous data parallel
    outer_optimizer: str = "nesterov"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    def __post_init__(self):
        counts = ("steps", "batch", "seq", "grad_accum", "eval_batches", "ckpt_every", "keep")
        for name in (*counts, "eval_every", "schedule_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SpmdError(f"--{name.replace('_', '-')}={value} must be positive")
        if self.warmup < 0:
            raise SpmdError(f"--warmup={self.warmup} must be zero or positive")
        if not 0 < self.lr < float("inf"):  # also refuses nan
            raise SpmdError(f"--lr={self.lr} must be a positive number")
        if self.resume and not self.ckpt_dir:
            raise SpmdError("--resume needs --ckpt-dir (where to find the checkpoint)")
        self.local_sgd()  # checks the local-SGD flags (--optimizer: when the run builds it)

    def build_model(self, vocab_size: int | None = None):
        from spmd.compiler.program import build_model  # jax and optax: only when needed

        model = build_model(
            self.model,
            dict(self.overrides),
            remat=self.remat,
            dtype=self.dtype,
            attention=self.attention,
            seq=self.seq,
            context_parallel=self.context_parallel,
        )
        if vocab_size and model.cfg.vocab_size < vocab_size:
            raise SpmdError(
                f"vocab_size={model.cfg.vocab_size} is smaller than the tokenizer's "
                f"{vocab_size}; use --set vocab_size={vocab_size}"
            )
        return model

    def pipeline(self):
        """The PipelineConfig these flags ask for (None: no pipeline flag given)."""
        if (self.pipeline_schedule, self.microbatches, self.virtual_stages) == (None,) * 3:
            return None
        from spmd.parallel.pipeline import PipelineConfig  # jax: only when needed

        schedule = self.pipeline_schedule or "gpipe"
        virtual = self.virtual_stages or (2 if schedule == "interleaved" else 1)
        return PipelineConfig(schedule, self.microbatches, virtual)

    def optimizer_config(self):
        from spmd.train import optim

        total = self.schedule_steps or self.steps
        return optim.OptimConfig(
            lr=self.lr, warmup_steps=self.warmup, total_steps=total, name=self.optimizer
        )

    def local_sgd(self):
        """The local-SGD settings, or None for synchronous training."""
        if self.local_steps is None:
            return None
        from spmd.parallel.local_sgd import LocalSGDConfig

        return LocalSGDConfig(
            self.local_steps, self.outer_optimizer, self.outer_lr, self.outer_momentum
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
