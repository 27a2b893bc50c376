"""KV-cache generation: cached logits against a full forward pass, sharded against one device,
batched against alone, sampling rules, stops, and the bad input the Generator refuses."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_spmd

import spmd
from spmd import checkpoint
from spmd.cli import main
from spmd.data.tokenizer import ByteTokenizer
from spmd.errors import SpmdError
from spmd.inference import (
    Generator,
    SamplingConfig,
    decode_step,
    init_cache,
    prefill,
    sample,
    unstack_layers,
)
from spmd.models import get_model, gpt

PROMPTS = [[5, 17, 99, 3, 42, 42, 7], [200], [1, 2, 3, 4]]
NEW = 12


@pytest.fixture(scope="module")
def model():
    return get_model("gpt-tiny", {"n_layers": 2, "max_seq_len": 64})


@pytest.fixture(scope="module")
def one_device():
    return spmd.Layout.make("data=1", devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def params(model, one_device):
    # A wider init than training's 0.02 gives decisive logits, so float rounding between
    # layouts cannot flip a greedy choice between two near-equal ids.
    specs = gpt.param_specs(dataclasses.replace(model.cfg, init_std=0.2))
    return one_device.init_params(specs, jax.random.key(1))


@pytest.fixture(scope="module")
def greedy(model, one_device, params):
    """The one-device greedy completions of PROMPTS, as a batch."""
    return Generator(model, one_device, SamplingConfig(max_new_tokens=NEW)).generate(
        params, PROMPTS
    )


def test_cached_logits_match_full_forward_at_every_position(model, params):
    """Prefill 3 slots (row 1 left-padded to 1 real token), then feed the rest one at a time."""
    cfg = model.cfg
    seqs = np.random.default_rng(0).integers(0, 256, (2, 10), dtype=np.int32)
    full = [gpt.forward(params, s[None], cfg)[0] for s in seqs]  # (t, v) per row
    t, pad = 3, np.array([0, 2], np.int32)
    prompt = np.stack([seqs[0, :3], np.r_[0, 0, seqs[1, 0]]]).astype(np.int32)
    fill = jax.jit(lambda p, c, x, pad: prefill(p, c, x, pad, cfg), donate_argnums=1)
    step = jax.jit(lambda p, c, x, s, pad: decode_step(p, c, x, s, pad, cfg), donate_argnums=1)
    layers = unstack_layers(params)
    logits, cache = fill(layers, init_cache(cfg, 2, 12), prompt, pad)
    chex.assert_trees_all_close(logits[0], full[0][2], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(logits[1], full[1][0], atol=1e-5, rtol=1e-5)
    for i in range(9):  # slot t+i holds row 0's position 3+i and row 1's position 1+i
        tokens = np.array([seqs[0, 3 + i] if i < 7 else 0, seqs[1, 1 + i]], np.int32)
        logits, cache = step(layers, cache, tokens, t + i, pad)
        if i < 7:
            chex.assert_trees_all_close(logits[0], full[0][3 + i], atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(logits[1], full[1][1 + i], atol=1e-5, rtol=1e-5)


def test_greedy_follows_the_full_forward_argmax(model, params, greedy):
    """Each greedy id is the argmax of a full, uncached forward pass over what came before."""
    seqs = [prompt + ids for prompt, ids in zip(PROMPTS, greedy.ids, strict=True)]
    width = max(map(len, seqs))
    # Right padding leaves a causal pass's earlier positions untouched: one batch, one compile.
    batch = np.array([seq + [0] * (width - len(seq)) for seq in seqs], np.int32)
    logits = np.asarray(gpt.forward(params, batch, model.cfg))
    for row, (prompt, ids) in enumerate(zip(PROMPTS, greedy.ids, strict=True)):
        expected = np.argmax(logits[row, len(prompt) - 1 : len(prompt) + len(ids) - 1], axis=-1)
        assert ids == expected.tolist()
    assert greedy.finish == ["length"] * len(PROMPTS)
    assert all(len(ids) == NEW for ids in greedy.ids)


def test_batched_prompts_complete_as_they_do_alone(model, one_device, params, greedy):
    gen = Generator(model, one_device, SamplingConfig(max_new_tokens=NEW))
    for prompt, ids in zip(PROMPTS, greedy.ids, strict=True):
        assert gen.generate(params, [prompt]).ids == [ids]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["tensor=2", "data=2,tensor=2"])
def test_sharded_greedy_matches_one_device(model, params, greedy, mesh):
    devices = jax.devices()[: 2 if mesh == "tensor=2" else 4]
    gen = Generator(
        model, spmd.Layout.make(mesh, devices=devices), SamplingConfig(max_new_tokens=NEW)
    )
    cache_spec = gen._cache_sharding(4, 16).k.spec  # 3 prompts pad to 4 rows on data=2
    assert cache_spec[2] == "tensor"
    assert cache_spec[1] == ("data" if "data" in mesh else None)
    assert gen.generate(params, PROMPTS).ids == greedy.ids


def _first_end(ids, eos, stops):
    """Reference: how many ids a row keeps, stopping after an EOS or a completed stop."""
    for j, tok in enumerate(ids):
        if tok == eos or any(tuple(ids[max(0, j + 1 - len(s)) : j + 1]) == s for s in stops):
            return j + 1, "eos" if tok == eos else "stop"
    return len(ids), "length"


def test_eos_and_stop_sequences_end_rows_and_the_loop(model, one_device, params, greedy):
    eos = greedy.ids[0][3]  # row 0 ends by its 4th id at the latest
    stops = (tuple(greedy.ids[1][2:4]), (999, 998))  # row 1 likewise, by a two-id stop
    sc = SamplingConfig(max_new_tokens=NEW, eos_id=eos, stop=stops)
    out = Generator(model, one_device, sc).generate(params, PROMPTS[:2])
    for row, ids in enumerate(greedy.ids[:2]):
        keep, why = _first_end(ids, eos, stops)
        assert out.ids[row] == ids[:keep]
        assert out.finish[row] == why
    assert out.steps == max(len(ids) for ids in out.ids) <= 4  # the loop ended early


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4096))
    draw = jax.jit(sample, static_argnums=2)
    key = jax.random.key(3)
    ids = np.asarray(draw(logits, key, SamplingConfig(temperature=1.0)))
    np.testing.assert_array_equal(ids, draw(logits, key, SamplingConfig(temperature=1.0)))
    assert set(ids.tolist()) == {0, 1, 2, 3}
    assert np.bincount(ids)[0] / ids.size == pytest.approx(0.5, abs=0.03)
    top2 = np.asarray(draw(logits, key, SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it, so ids 0 and 1 stay.
    nucleus = np.asarray(draw(logits, key, SamplingConfig(temperature=1.0, top_p=0.7)))
    assert set(nucleus.tolist()) == {0, 1}
    assert np.bincount(nucleus)[0] / nucleus.size == pytest.approx(0.5 / 0.8, abs=0.03)
    greedy = SamplingConfig(temperature=0.0)
    assert set(np.asarray(draw(logits, key, greedy)).tolist()) == {0}
    limited = SamplingConfig(temperature=1.0, vocab_limit=2)
    assert set(np.asarray(draw(logits, key, limited)).tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"top_p": 0.0}, "--top-p=0.0 must be in (0, 1]"),
        ({"top_p": 1.5}, "--top-p=1.5 must be in (0, 1]"),
        ({"temperature": -1.0}, "--temperature"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"stop": ((),)}, "stop sequence"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, words):
    with pytest.raises(SpmdError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SamplingConfig(**kwargs)


def test_generator_refuses_empty_and_too_long_prompts(model, one_device, params):
    gen = Generator(model, one_device, SamplingConfig(max_new_tokens=4))
    with pytest.raises(SpmdError, match="prompt 1 is empty"):
        gen.generate(params, [[1], []])
    with pytest.raises(SpmdError, match="65 tokens, longer than the model's max_seq_len=64"):
        gen.generate(params, [[1] * 65])
    with pytest.raises(SpmdError, match=r"ids outside \[0, 384\)"):
        gen.generate(params, [[384]])


def test_new_tokens_stop_at_the_models_context(model, one_device):
    gen = Generator(model, one_device, SamplingConfig(max_new_tokens=50))
    assert gen.shapes([60, 3]) == (2, 64, 5)  # 60 + 5 - 1 = 64 positions, the last fed back
    assert gen.shapes([64]) == (1, 64, 1)
    assert gen.shapes([3]) == (1, 16, 50)


# ----------------------------------------------------------------------------- the CLI

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n" * 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 2-step gpt-tiny checkpoint (max_seq_len 64), trained once for the CLI tests."""
    root = tmp_path_factory.mktemp("gen")
    (root / "code.py").write_text(TEXT)
    out = run_spmd(
        "train", "--model", "gpt-tiny", "--set", "n_layers=2,max_seq_len=64", "--devices", "1",
        "--mesh", "data=1", "--steps", "2", "--batch", "2", "--seq", "16", "--no-progress",
        "--data", str(root / "code.py"), "--ckpt-dir", str(root / "ckpt"), "--ckpt-every", "2",
        "--sync-ckpt",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return str(root / "ckpt")


def _generate_json(*args):
    out = run_spmd("generate", *args, "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.slow
def test_cli_generates_from_a_checkpoint_on_a_mesh(ckpt, one_device, capsys):
    """Greedy `spmd generate --json` on data=2,tensor=2 equals the in-process one-device run."""
    flags = ["--ckpt-dir", ckpt, "--temperature", "0", "--max-new-tokens", "10"]
    rows = _generate_json(*flags, "--prompt", "def ", "--prompt", "class P", "--devices", "4",
                          "--mesh", "data=2,tensor=2")  # fmt: skip
    model = get_model("gpt-tiny", {"n_layers": 2, "max_seq_len": 64})
    tok = ByteTokenizer()
    sc = SamplingConfig(max_new_tokens=10, eos_id=tok.eos_id, vocab_limit=tok.eos_id + 1)
    gen = Generator(model, one_device, sc)
    params = checkpoint.restore_params(ckpt, model, one_device)
    expected = gen.generate(params, [list(tok.encode("def ")), list(tok.encode("class P"))])
    assert [r["prompt"] for r in rows] == ["def ", "class P"]
    assert [r["ids"] for r in rows] == expected.ids
    assert [r["completion"] for r in rows] == [tok.decode(ids) for ids in expected.ids]
    assert rows[0]["prompt_ids"] == tok.encode("def ").tolist()
    assert {"compile_s", "prefill_s", "decode_s", "tokens_per_s"} <= rows[0]["timings"].keys()

    # One prompt streams (here in-process, on one device): the prompt, then the same text.
    assert main(["generate", *flags, "--prompt", "def "]) == 0
    assert capsys.readouterr().out == "def " + rows[0]["completion"] + "\n"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "x" * 65], "65 tokens, longer than the model's max_seq_len=64"),
        (["--prompt", "x", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p=1.5 must be in (0, 1]"),
        (["--prompt", "x", "--step", "7"], "--step 7 is not in"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(ckpt, capsys, args, words):
    assert main(["generate", "--ckpt-dir", ckpt, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_cli_missing_checkpoint_is_one_line_and_status_2(tmp_path):
    out = run_spmd("generate", "--ckpt-dir", str(tmp_path / "nope"), "--prompt", "def ")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"spmd: error: checkpoint directory {tmp_path / 'nope'} does not exist"
    ]
