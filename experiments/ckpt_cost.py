"""What a checkpoint costs the training loop: an asynchronous save against a synchronous one.

Two identical training runs save every `--every` steps, one with orbax's asynchronous saves
(the default) and one with `--sync-ckpt`. For each save the trainer records how long the
loop was blocked (`ckpt_blocked_s`: the device-to-host copy for an async save, the whole
write for a sync one). The step after a save shows what the background write costs the
steps it overlaps (on a CPU it competes with the step for the same cores).

    make bench-ckpt        # gpt-small, fsdp=4,tensor=2 on 8 simulated CPU devices
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ckpt_cost.json"


def measure(base: dict, async_ckpt: bool, workdir: Path) -> dict:
    from spmd import checkpoint as ckpt
    from spmd.train import trainer

    tag = "async" if async_ckpt else "sync"
    cfg = trainer.TrainConfig(
        **base, ckpt_dir=str(workdir / tag), async_ckpt=async_ckpt, keep=2, progress=False,
        metrics_file=str(workdir / f"{tag}.jsonl"),
    )  # fmt: skip
    trainer.run(cfg)
    rows = [json.loads(line) for line in Path(cfg.metrics_file).read_text().splitlines()]
    saves = [r for r in rows if "ckpt_blocked_s" in r]
    saved_steps = {r["step"] for r in saves}
    after = [r["step_time_s"] for r in rows if r["step"] - 1 in saved_steps]
    plain = [r["step_time_s"] for r in rows[2:] if r["step"] not in saved_steps | {
        s + 1 for s in saved_steps}]  # fmt: skip
    return {
        "mode": tag,
        "saves": len(saves),
        "first_blocked_s": saves[0]["ckpt_blocked_s"],
        # The first save also builds orbax's machinery; the later ones are the steady cost.
        "blocked_s": statistics.median(r["ckpt_blocked_s"] for r in saves[1:] or saves),
        "step_s": statistics.median(plain) if plain else float("nan"),
        "step_after_save_s": statistics.median(after) if after else float("nan"),
        "checkpoint_mb": ckpt.disk_bytes(cfg.ckpt_dir, max(ckpt.all_steps(cfg.ckpt_dir))) / 1e6,
    }


def run(model="gpt-small", mesh="fsdp=4,tensor=2", steps=14, every=3, batch=16, seq=128,
        overrides=(), data=None, workdir=None) -> list[dict]:  # fmt: skip
    base = dict(model=model, mesh=mesh, steps=steps, ckpt_every=every, batch=batch, seq=seq,
                overrides=tuple(overrides), data=data, lr=1e-3)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        return [measure(base, mode, Path(tmp)) for mode in (True, False)]


def report(results: list[dict]) -> str:
    lines = [f"{'mode':6s} {'saves':>5s} {'blocked (first)':>16s} {'blocked':>9s} "
             f"{'step':>8s} {'step after save':>16s} {'size':>9s}"]  # fmt: skip
    for r in results:
        lines.append(
            f"{r['mode']:6s} {r['saves']:5d} {r['first_blocked_s']:15.3f}s {r['blocked_s']:8.3f}s "
            f"{r['step_s']:7.3f}s {r['step_after_save_s']:15.3f}s {r['checkpoint_mb']:7.1f}MB"
        )
    a, s = results
    lines.append(
        f"an async save blocks the loop {a['blocked_s']:.3f}s against {s['blocked_s']:.3f}s "
        f"for a sync one ({s['blocked_s'] / a['blocked_s']:.1f}x less)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-small")
    p.add_argument("--mesh", default="fsdp=4,tensor=2")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--data", help="default: the Python stdlib")
    p.add_argument("--set", dest="overrides", default="", help="model overrides, e.g. n_layers=2")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    import spmd
    from spmd.models import parse_overrides

    spmd.simulate_cpu_devices(a.devices)
    overrides = tuple(parse_overrides(a.overrides).items())
    results = run(a.model, a.mesh, a.steps, a.every, a.batch, a.seq, overrides, a.data)
    print(report(results))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(a).items() if k != "out"}
    Path(a.out).write_text(json.dumps({"config": config, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
