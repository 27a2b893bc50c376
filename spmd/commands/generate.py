"""`spmd generate`: complete prompts with a trained checkpoint, streaming the text."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from spmd.cli import positive_int
from spmd.errors import SpmdError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete prompts with a trained checkpoint")
    p.add_argument("--ckpt-dir", required=True, help="a checkpoint folder written by spmd train")
    p.add_argument("--step", type=int, help="the checkpoint step (default: the newest valid)")
    p.add_argument("--prompt", action="append", default=[], help="text to complete (repeatable)")
    p.add_argument("--prompt-file", help="a file whose whole text is one more prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest ids (0: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop after this text")
    p.add_argument("--no-eos", action="store_true", help="keep going past end-of-document")
    p.add_argument("--mesh", help="e.g. data=2,tensor=2 over all devices (default: one device)")
    p.add_argument("--devices", type=positive_int, help="simulate N CPU devices")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, no stream")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts.append(_read_text_file("--prompt-file", args.prompt_file))
    if not prompts:
        raise SpmdError("give a prompt with --prompt TEXT or --prompt-file F")
    for i, text in enumerate(prompts):
        if not text:
            raise SpmdError(f"prompt {i} is empty; give at least one character of text")
    return prompts


def _read_text_file(flag: str, name: str) -> str:
    path = Path(name)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise SpmdError(f"{flag} {name} {problem}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpmdError(
            f"{flag} {name} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    except OSError as e:
        raise SpmdError(f"{flag} {name}: cannot read it ({e.strerror})") from None


def _check_ckpt_dir(name: str, step: int | None) -> None:
    """A file as --ckpt-dir, or a --step it does not hold, would otherwise be reported as
    missing, or as a step that is invalid."""
    from spmd import checkpoint

    if Path(name).exists() and not Path(name).is_dir():
        raise SpmdError(f"--ckpt-dir {name} is a file, not a checkpoint folder")
    steps = checkpoint.all_steps(name)
    if step is not None and steps and step not in steps:
        listed = ", ".join(map(str, steps))
        raise SpmdError(f"--step {step} is not in {name}; its steps are {listed}")


def run(args) -> int:
    from spmd.inference import SamplingConfig

    prompts = read_prompts(args)
    _check_ckpt_dir(args.ckpt_dir, args.step)
    sampling = SamplingConfig(  # checks the flags before anything slow happens
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if any(not s for s in args.stop):
        raise SpmdError("--stop must not be empty")
    t0 = time.perf_counter()
    generator, tokenizer = build(args, sampling)
    ids = [[int(i) for i in tokenizer.encode(p)] for p in prompts]
    generator.check(ids)  # before the weights are read
    params = load_params(args, generator)
    load_s = time.perf_counter() - t0
    stream = None if args.json or len(prompts) > 1 else _TextStream(tokenizer, prompts[0])
    result = generator.generate(params, ids, stream=stream, chunk=8 if stream else None)
    if stream:
        stream.close()
        new, secs = len(result.ids[0]), result.prefill_s + result.decode_s
        print(f"spmd: {new} tokens in {secs:.2f}s ({new / max(secs, 1e-9):.1f} tokens/s; "
              f"compile {result.compile_s:.1f}s, load {load_s:.1f}s)", file=sys.stderr)  # fmt: skip
    if args.json or len(prompts) > 1:
        _print_all(args.json, prompts, ids, result, tokenizer, load_s)
    return 0


def build(args, sampling):
    """(Generator, tokenizer) from the checkpoint's run config."""
    import jax

    from spmd import checkpoint
    from spmd.data.tokenizer import ByteTokenizer, checkpoint_tokenizer, load_tokenizer
    from spmd.inference import Generator
    from spmd.layout import Layout
    from spmd.models import get_model

    run_cfg = checkpoint.load_run_config(args.ckpt_dir, args.step)
    model = get_model(run_cfg["model"], dict(run_cfg.get("overrides") or {}))
    tokenizer = load_tokenizer(checkpoint_tokenizer(run_cfg.get("tokenizer"), args.ckpt_dir))
    stop = tuple(tuple(int(i) for i in tokenizer.encode(s)) for s in args.stop)
    sampling = dataclasses.replace(
        sampling,
        eos_id=None if args.no_eos else tokenizer.eos_id,
        stop=tuple(s for s in stop if s),
        # Ids past the byte vocabulary are padding; a briefly trained model still gives them
        # mass, and they decode to nothing.
        vocab_limit=tokenizer.eos_id + 1 if isinstance(tokenizer, ByteTokenizer) else None,
    )
    layout = Layout.make(args.mesh) if args.mesh else Layout.make("data=1", None, jax.devices()[:1])
    return Generator(model, layout, sampling), tokenizer


def load_params(args, generator):
    """The checkpoint's weights, read straight onto the mesh, as per-layer decode weights."""
    from spmd import checkpoint

    return generator.prepare(
        checkpoint.restore_params(args.ckpt_dir, generator.model, generator.layout, args.step)
    )


class _TextStream:
    """Prints the prompt, then text as ids arrive; holds back a half-decoded UTF-8 character."""

    def __init__(self, tokenizer, prompt: str):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def __call__(self, new_ids_per_row) -> None:
        self.ids.extend(new_ids_per_row[0])
        self._show(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text

    def close(self) -> None:
        self._show(self.tokenizer.decode(self.ids))
        sys.stdout.write("\n")
        sys.stdout.flush()


def _print_all(as_json: bool, prompts, prompt_ids, result, tokenizer, load_s: float) -> None:
    new = sum(len(ids) for ids in result.ids)
    timings = {
        "load_s": round(load_s, 4),
        "compile_s": round(result.compile_s, 4),
        "prefill_s": round(result.prefill_s, 4),
        "decode_s": round(result.decode_s, 4),
        "new_tokens": new,
        "tokens_per_s": round(new / max(result.prefill_s + result.decode_s, 1e-9), 2),
    }
    for prompt, pids, ids, finish in zip(
        prompts, prompt_ids, result.ids, result.finish, strict=True
    ):
        completion = tokenizer.decode(ids)
        if as_json:
            row = {
                "prompt": prompt,
                "completion": completion,
                "prompt_ids": pids,
                "ids": ids,
                "finish": finish,
                "timings": timings,
            }
            print(json.dumps(row))
        else:
            print(f"{prompt}{completion}\n" + "-" * 40)
