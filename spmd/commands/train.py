"""`spmd train`: train a model on a device mesh."""

from __future__ import annotations

import sys

from spmd.cli import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on a device mesh")
    p.add_argument("--model", default="gpt-tiny", help="a preset name (see `spmd models`)")
    p.add_argument(
        "--set",
        dest="overrides",
        default="",
        help="override model fields, e.g. d_model=256,n_layers=2",
    )
    p.add_argument(
        "--mesh", default="data=-1", help="e.g. fsdp=4,tensor=2, or auto (the planner's pick)"
    )
    p.add_argument(
        "--devices", type=positive_int, help="simulate N CPU devices (must come before JAX starts)"
    )
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--batch", type=positive_int, default=8, help="the global batch, in sequences")
    p.add_argument("--seq", type=positive_int, default=128, help="sequence length in tokens")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument(
        "--schedule-steps",
        type=positive_int,
        help="length of the LR schedule (default: --steps; keep it fixed when extending a run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="a text file, folder, glob or .jsonl (default: Python stdlib)")
    p.add_argument("--tokenizer", help="BPE tokenizer JSON (default: bytes)")
    p.add_argument("--metrics-file", help="write one JSON object per step here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval-every", type=positive_int, help="eval loss on the validation split")
    p.add_argument("--eval-batches", type=positive_int, default=4, help="batches per eval")
    p.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard logs here")
    p.add_argument("--plot", metavar="FILE", help="write a loss-curve PNG at the end")
    p.add_argument("--ckpt-dir", help="save sharded checkpoints here (asynchronously)")
    p.add_argument("--ckpt-every", type=positive_int, default=100, help="steps between saves")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid ckpt")
    p.add_argument("--sync-ckpt", action="store_true", help="block on every save (for comparison)")


def run(args) -> int:
    from spmd.models import parse_overrides
    from spmd.train.outputs import check_output_paths
    from spmd.train.trainer import TrainConfig, run

    check_output_paths(args)  # the flags' names are TrainConfig's; --mesh auto compiles next
    mesh = args.mesh
    if mesh == "auto":  # the planner picks the layout for the devices JAX sees
        from spmd.compiler.planner import plan_mesh_for_train

        mesh = plan_mesh_for_train(
            args.model, parse_overrides(args.overrides), args.batch, args.seq, args.remat,
            args.grad_accum, args.dtype,
        )  # fmt: skip
    cfg = TrainConfig(
        model=args.model,
        overrides=tuple(parse_overrides(args.overrides).items()),
        mesh=mesh,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        grad_accum=args.grad_accum,
        remat=args.remat,
        dtype=args.dtype,
        lr=args.lr,
        warmup=args.warmup,
        schedule_steps=args.schedule_steps,
        seed=args.seed,
        data=args.data,
        tokenizer=args.tokenizer,
        metrics_file=args.metrics_file,
        progress=not args.no_progress,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        tensorboard=args.tensorboard,
        plot=args.plot,
        ckpt_dir=args.ckpt_dir,
        ckpt_every=args.ckpt_every,
        keep=args.keep,
        resume=args.resume,
        async_ckpt=not args.sync_ckpt,
    )
    run(cfg, argv=sys.argv[1:])
    return 0
