"""Hugging Face Llama checkpoints in and out: exact logits, bit-identical round trips, the
same greedy tokens as transformers, a fine-tune on a mesh, and bad input in one line.

Every model here is a tiny random `LlamaForCausalLM` with GQA, built and saved on CPU in
float32; nothing is downloaded. torch is slow to import, so the models are module fixtures.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import jsonl_corpus
from test_bad_input import fails_cleanly

from spmd.cli import main
from spmd.interop import hf
from spmd.layout import Layout
from spmd.models import gpt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB = 384  # room for the byte alphabet and EOS of a BPE trained by spmd
PROMPT = "def add(x, y):\n    return"


def llama_config(tie: bool):
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads per kv head
        max_position_embeddings=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )


def save_llama(path, tie: bool, seed: int, dtype=None):
    """A random Llama saved as transformers saves one, in several shards with an index."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(tie)).eval()
    (model.to(dtype) if dtype else model).save_pretrained(path, max_shard_size="100KB")
    return model


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from spmd.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = ["def add(x, y):\n    return x + y\n", "for i in range(10): print(i)\n"] * 50
    train_bpe(texts, VOCAB, str(path))
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer_json):
    """(transformers model, its folder with a tokenizer.json, the converted checkpoint)."""
    root = tmp_path_factory.mktemp("llama")
    model = save_llama(root / "hf", tie=False, seed=0)
    shutil.copyfile(tokenizer_json, root / "hf" / "tokenizer.json")
    assert (
        main(["convert", "hf-to-spmd", "--hf-dir", str(root / "hf"), "--out", str(root / "ck")])
        == 0
    )
    return model, str(root / "hf"), str(root / "ck")


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return save_llama(root / "hf", tie=True, seed=2), str(root / "hf"), None


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize(
    "which, mesh",
    [("llama", "data=1"), ("llama", "tensor=2,fsdp=2"), ("tied_llama", "tensor=2,fsdp=2")],
)
def test_logits_equal_transformers(request, which, mesh):
    model, hf_dir, _ = request.getfixturevalue(which)
    devices = jax.devices()[:1] if mesh == "data=1" else jax.devices()[:4]
    layout = Layout.make(mesh, None, devices)
    spmd_model, params, _ = hf.load_hf_params(hf_dir, layout)
    if mesh != "data=1":  # born on the target shards, not gathered anywhere
        assert not params["layers"]["wq"].sharding.is_fully_replicated
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)
    forward = jax.jit(layout.traced(gpt.forward), static_argnums=2)
    ours = np.asarray(forward(params, tokens, spmd_model.cfg))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4, rtol=1e-4)


def read_all(folder) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("tie, dtype", [(False, None), (True, "bfloat16")])
def test_round_trip_is_bit_identical(tmp_path, tie, dtype):
    save_llama(tmp_path / "hf", tie=tie, seed=1, dtype=dtype and getattr(torch, dtype))
    argv = [
        "convert",
        "hf-to-spmd",
        "--hf-dir",
        str(tmp_path / "hf"),
        "--out",
        str(tmp_path / "ck"),
    ]
    assert main(argv) == 0
    back = tmp_path / "back"
    argv = ["convert", "spmd-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(back),
            "--max-shard-size", "100KB"]  # fmt: skip
    assert main(argv) == 0
    original, again = read_all(tmp_path / "hf"), read_all(back)
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype, name
        assert again[name].tobytes() == tensor.tobytes(), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(original)
    # transformers reads the folder back as the same model
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(back))
    assert reloaded.config.tie_word_embeddings == tie
    assert reloaded.config.num_key_value_heads == 2


def test_greedy_generation_equals_transformers(llama, capsys, tokenizer_json):
    from tokenizers import Tokenizer

    model, _, ckpt = llama
    capsys.readouterr()
    argv = ["generate", "--ckpt-dir", ckpt, "--prompt", PROMPT, "--temperature", "0",
            "--no-eos", "--max-new-tokens", "16", "--json"]  # fmt: skip
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = Tokenizer.from_file(tokenizer_json).encode(PROMPT).ids
    assert row["prompt_ids"] == ids  # the prompt went in as text, through tokenizer.json
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
    assert row["ids"] == out[0, len(ids) :].tolist()


@pytest.mark.slow  # ~30 s: one compile of the train step on 8 devices
def test_fine_tune_from_converted_checkpoint_on_a_mesh(llama, tmp_path):
    from spmd import checkpoint as ckpt
    from spmd.models import get_model

    _, _, source = llama
    data = jsonl_corpus(tmp_path / "docs.jsonl", docs=60)
    run = str(tmp_path / "run")
    metrics = tmp_path / "m.jsonl"
    argv = ["train", "--init-from", source, "--mesh", "fsdp=2,tensor=2,data=2", "--steps", "3",
            "--batch", "8", "--seq", "32", "--data", data, "--ckpt-dir", run, "--lr", "1e-3",
            "--warmup", "0", "--no-progress", "--metrics-file", str(metrics)]  # fmt: skip
    assert main(argv) == 0
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    # The fine-tune resumes as any run does, with its flags (--init-from included).
    assert main([*argv[:-2], "--steps", "4", "--mesh", "fsdp=4,tensor=2", "--resume"]) == 0
    config = ckpt.load_run_config(run)
    assert (
        config["init_from"] == source
        and ckpt.all_steps(run) == [3, 4]
        and config["tokenizer"].endswith("tokenizer.json")
    )
    model = get_model(config["model"], dict(config["overrides"]))
    layout = Layout.make("data=1", None, jax.devices()[:1])
    before = ckpt.restore_params(source, model, layout)
    after = ckpt.restore_params(run, model, layout)
    # Three Adam steps of 1e-3 move each weight by a few 1e-3 at most: the run started from
    # the converted weights, not from a random init (which differs by ~0.1 somewhere).
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         before, after)  # fmt: skip
    assert 0 < max(jax.tree.leaves(moved)) < 0.01
    # The fine-tuned weights go back out as a Llama that transformers computes identically.
    back = tmp_path / "back"
    assert main(["convert", "spmd-to-hf", "--ckpt", run, "--out", str(back)]) == 0
    tuned = transformers.LlamaForCausalLM.from_pretrained(str(back)).eval()
    assert (back / "tokenizer.json").is_file() and (back / "generation_config.json").is_file()
    assert json.loads((back / "config.json").read_text())["bos_token_id"] == 1  # kept from HF
    tokens = np.random.default_rng(1).integers(0, VOCAB, (1, 16)).astype(np.int32)
    ours = np.asarray(jax.jit(gpt.forward, static_argnums=2)(after, tokens, model.cfg))
    np.testing.assert_allclose(ours, hf_logits(tuned, tokens), atol=1e-4, rtol=1e-4)


def test_init_from_refuses_a_shape_change(llama, capsys):
    argv = ["train", "--init-from", llama[2], "--set", "d_model=128", "--steps", "1"]
    fails_cleanly(capsys, argv, "--set d_model=128 changes the shape of the weights")
    argv = ["train", "--init-from", llama[2], "--model", "gpt-small", "--steps", "1"]
    fails_cleanly(capsys, argv, "--model gpt-small contradicts --init-from")


def test_resume_on_a_converted_checkpoint_points_to_init_from(llama, capsys):
    argv = ["train", "--resume", "--ckpt-dir", llama[2], "--steps", "1"]
    fails_cleanly(capsys, argv, f"fine-tune them with --init-from {llama[2]}")


def test_convert_experiment_runs_tiny(tmp_path, capsys):
    from experiments import hf_convert

    tiny = "n_layers=1,d_model=32,n_heads=2,n_kv_heads=1,head_dim=16,d_ff=64,vocab_size=256"
    result = hf_convert.main(["--set", tiny, "--out", str(tmp_path / "r.json")])
    for way in ("hf_to_spmd", "spmd_to_hf"):
        assert result[way]["seconds"] > 0 and result[way]["peak_rss_mb"] > 0
    assert "peak RSS" in capsys.readouterr().out


def broken_copy(hf_dir, tmp_path, edit_config=None, drop=None):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    if edit_config:
        config = json.loads((bad / "config.json").read_text())
        config.update(edit_config)
        (bad / "config.json").write_text(json.dumps(config))
    if drop:
        index_path = bad / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        file = index["weight_map"].pop(drop)
        tensors = safetensors_numpy.load_file(str(bad / file))
        del tensors[drop]
        safetensors_numpy.save_file(tensors, str(bad / file), metadata={"format": "pt"})
        index_path.write_text(json.dumps(index))
    return str(bad)


@pytest.mark.parametrize(
    "edit, drop, message",
    [
        ({"architectures": ["MistralForCausalLM"]}, None, "architectures=['MistralForCausalLM']"),
        (None, "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight is missing"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, None, "rope scaling"),
        ({"mlp_bias": True}, None, "mlp_bias=true is not supported"),
        (
            {"intermediate_size": 192},
            None,
            "gate_proj.weight has shape [160, 64] but config.json implies [192, 64]",
        ),
    ],
)
def test_bad_checkpoints_fail_in_one_line(llama, tmp_path, capsys, edit, drop, message):
    bad = broken_copy(llama[1], tmp_path, edit, drop)
    argv = ["convert", "hf-to-spmd", "--hf-dir", bad, "--out", str(tmp_path / "ck")]
    fails_cleanly(capsys, argv, message)
    assert not (tmp_path / "ck").exists()  # nothing half-written


def test_convert_refuses_to_overwrite(llama, tmp_path, capsys):
    argv = ["convert", "hf-to-spmd", "--hf-dir", llama[1], "--out", llama[2]]
    fails_cleanly(capsys, argv, "already holds a checkpoint")
    argv = ["convert", "spmd-to-hf", "--ckpt", llama[2], "--out", llama[1]]
    fails_cleanly(capsys, argv, "is not empty")


def test_a_llama_tokenizer_ends_documents_with_its_own_eos(tmp_path):
    from tokenizers import Tokenizer, models

    from spmd.data.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == 2


def test_a_moved_converted_checkpoint_still_finds_its_tokenizer(llama, tmp_path):
    from spmd.train.config import TrainConfig
    from spmd.train.init_from import resolve

    moved = tmp_path / "moved"
    shutil.copytree(llama[2], moved)
    config_file = moved / "0" / "config" / "metadata"
    config = json.loads(config_file.read_text())
    config["tokenizer"] = str(tmp_path / "gone" / "tokenizer.json")  # where it was written
    config_file.write_text(json.dumps(config))
    cfg = resolve(TrainConfig(init_from=str(moved)))
    assert cfg.tokenizer == str(moved / "tokenizer.json")
