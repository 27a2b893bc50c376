"""Bad input ends with one clear line on stderr and exit status 2, never a traceback."""

import pytest
from conftest import run_spmd

from spmd.cli import main

TRAIN = ["train", "--model", "gpt-tiny", "--steps", "1", "--no-progress"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 200)
    return str(path)


def fails_cleanly(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "gpt-huge"], "unknown model 'gpt-huge'"),
        (["--mesh", "fsdp=4,pipeline=2"], "unknown mesh axis 'pipeline'"),
        (["--mesh", "fsdp=4"], "has 4 devices but 8 are available"),
        (["--mesh", "data=8", "--batch", "12"], "batch=12 is not divisible by data=8"),
        (
            ["--mesh", "data=2,tensor=4", "--set", "n_heads=6,n_kv_heads=6"],
            "heads=6 is not divisible by tensor=4",
        ),
        (["--seq", "-3"], "argument --seq: -3 must be a positive integer"),
        (["--data", "/no/such/corpus.txt"], "--data /no/such/corpus.txt does not exist"),
        (["--set", "depth=3"], "unknown model field 'depth'"),
        (
            ["--mesh", "data=8", "--batch", "8", "--grad-accum", "2"],
            "microbatch=4 is not divisible by data=8",
        ),
        (
            ["--model", "moe-tiny", "--mesh", "expert=4,data=2", "--set", "n_experts=6"],
            "experts=6 is not divisible by expert=4",
        ),
        (["--model", "moe-tiny", "--set", "top_k=3"], "top_k=3 must be 1 or 2"),
        (["--model", "moe-tiny", "--set", "n_experts=1"], "top_k=2 exceeds n_experts=1"),
    ],
)
def test_train_rejects(capsys, text_file, extra, message):
    argv = [*TRAIN, "--data", text_file, "--batch", "8", "--seq", "16", *extra]
    fails_cleanly(capsys, argv, message)


def test_devices_that_cannot_be_simulated_any_more(capsys, text_file):
    fails_cleanly(capsys, [*TRAIN, "--devices", "4"], "already started with 8")


def test_unknown_command(capsys):
    fails_cleanly(capsys, ["fly"], "invalid choice: 'fly'")


@pytest.mark.slow
def test_real_process_exit_status_and_single_line():
    out = run_spmd("train", "--devices", "4", "--mesh", "tensor=3", "--steps", "1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "spmd: error: mesh tensor=3 has 3 devices but 4 are available; "
        "use --devices 3 or a mesh whose sizes multiply to 4"
    ]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path)


@pytest.mark.parametrize(
    "flag, target, message",
    [
        ("--metrics-file", "{dir}/runs/a/", "is a folder; give a file, e.g. {dir}/runs/a/metrics"),
        ("--metrics-file", "{file}/m.jsonl", "{file} is a file, not a folder"),
        ("--plot", "{dir}/loss.txt", "matplotlib cannot write .txt files; use one of"),
        ("--plot", "{dir}/loss", "it has no extension; use one of .avif"),
        ("--ckpt-dir", "{file}", "--ckpt-dir {file} is a file, not a folder"),
        ("--tensorboard", "{file}", "--tensorboard {file} is a file, not a folder"),
    ],
)
def test_train_rejects_output_paths_before_compiling(
    capsys, monkeypatch, tmp_path, text_file, a_file, flag, target, message
):
    from spmd.compiler.program import TrainProgram

    def never(*_):
        raise AssertionError("compiled before checking the output paths")

    monkeypatch.setattr(TrainProgram, "compile", never)
    fill = {"dir": str(tmp_path), "file": a_file}
    argv = [*TRAIN, "--data", text_file, "--batch", "8", "--seq", "16"]
    fails_cleanly(capsys, [*argv, flag, target.format(**fill)], message.format(**fill))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--warmup", "-5"], "--warmup=-5 must be zero or positive"),
        (["--lr", "-1"], "--lr=-1.0 must be a positive number"),
        (["--lr", "nan"], "--lr=nan must be a positive number"),
    ],
)
def test_train_names_the_flag(capsys, text_file, extra, message):
    fails_cleanly(capsys, [*TRAIN, "--data", text_file, *extra], message)


def test_train_rejects_a_binary_data_file(capsys, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("plain text\n" * 50)
    (folder / "bad.txt").write_bytes(b"\x00\xb5\xff binary")
    fails_cleanly(
        capsys,
        [*TRAIN, "--data", str(folder)],
        f"--data: {folder / 'bad.txt'} is not UTF-8 text (byte 0xb5 at offset 1)",
    )


def test_explain_checks_the_hlo_folder_before_compiling(capsys, tmp_path):
    hlo = str(tmp_path / "missing" / "x.hlo")
    argv = ["explain", "--model", "gpt-tiny", "--devices", "8", "--hlo", hlo]
    fails_cleanly(capsys, argv, f"--hlo {hlo}: the folder {tmp_path / 'missing'} does not exist")


def test_more_cpu_devices_than_xla_can_compile_for():
    import jax

    from spmd.errors import SpmdError
    from spmd.mesh import make_mesh

    with pytest.raises(SpmdError, match="2056 CPU devices are more than XLA:CPU can compile"):
        make_mesh("data=-1", jax.devices() * 257)


def test_generate_rejects_a_binary_prompt_file(capsys, tmp_path):
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(b"ok \xff\xfe")
    argv = ["generate", "--ckpt-dir", str(tmp_path), "--prompt-file", str(prompt)]
    fails_cleanly(capsys, argv, f"--prompt-file {prompt} is not UTF-8 text (byte 0xff at offset 3)")


def test_generate_and_checkpoint_info_say_a_file_is_not_a_folder(capsys, a_file):
    argv = ["generate", "--ckpt-dir", a_file, "--prompt", "hi"]
    fails_cleanly(capsys, argv, f"--ckpt-dir {a_file} is a file, not a checkpoint folder")
    fails_cleanly(capsys, ["checkpoint", "info", a_file], f"{a_file} is a file, not a folder")


def test_mesh_hint_under_spmd_launch(monkeypatch):
    from spmd import mesh
    from spmd.errors import SpmdError

    with pytest.raises(SpmdError, match="use --devices 8 or a mesh whose sizes multiply to 2"):
        mesh.parse_mesh("fsdp=8", 2)
    monkeypatch.setattr(mesh, "launched_processes", lambda: 2)
    with pytest.raises(SpmdError, match="use spmd launch -n 2 --devices-per-process 4 or a mesh"):
        mesh.parse_mesh("fsdp=8", 2)
    with pytest.raises(SpmdError, match=r"2 processes cannot share 3 devices evenly"):
        mesh.parse_mesh("fsdp=3", 2)


def test_launched_processes_needs_the_launchers_variable_and_a_joined_job(monkeypatch):
    import jax

    from spmd import distributed

    group = {"SPMD_COORDINATOR": "127.0.0.1:1234", "SPMD_NUM_PROCESSES": "3"}
    for name, value in {**group, "SPMD_PROCESS_ID": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.launched_processes() is None  # SPMD_* set by hand: not spmd launch
    monkeypatch.setenv("SPMD_DEVICES_PER_PROCESS", "1")
    assert distributed.launched_processes() == 3
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert distributed.launched_processes() is None  # e.g. explain, which never joins


@pytest.mark.slow
def test_launched_train_suggests_devices_per_process():
    out = run_spmd("launch", "-n", "2", "--", "spmd", "train", "--mesh", "fsdp=8", "--steps", "1")
    assert out.returncode == 2
    assert (
        "mesh fsdp=8 has 8 devices but 2 are available; use spmd launch -n 2 "
        "--devices-per-process 4 or a mesh whose sizes multiply to 2"
    ) in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_generate_names_a_step_the_folder_does_not_hold(capsys, tmp_path):
    for step in (1, 2):
        (tmp_path / str(step)).mkdir()
    argv = ["generate", "--ckpt-dir", str(tmp_path), "--prompt", "hi", "--step", "7"]
    fails_cleanly(capsys, argv, f"--step 7 is not in {tmp_path}; its steps are 1, 2")


def test_train_says_a_tokenizer_folder_is_not_a_file(capsys, tmp_path):
    argv = [*TRAIN, "--tokenizer", str(tmp_path)]
    fails_cleanly(capsys, argv, f"--tokenizer {tmp_path} is a folder, not a JSON file")


@pytest.mark.parametrize(
    "out, message",
    [
        ("{dir}/", "--out {dir}/ is a folder; give a file, e.g. {dir}/tokenizer.json"),
        ("{file}/tok.json", "--out {file}/tok.json: {file} is a file, not a folder"),
    ],
)
def test_tokenizer_checks_out_before_training(capsys, tmp_path, text_file, a_file, out, message):
    fill = {"dir": str(tmp_path), "file": a_file}
    argv = ["tokenizer", "train", "--data", text_file, "--vocab", "300", "--out"]
    fails_cleanly(capsys, [*argv, out.format(**fill)], message.format(**fill))


def test_explain_refuses_mesh_auto(capsys):
    argv = ["explain", "--model", "gpt-tiny", "--mesh", "auto"]
    fails_cleanly(capsys, argv, "spmd explain needs an explicit --mesh; spmd plan shows")
