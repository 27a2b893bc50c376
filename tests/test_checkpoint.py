"""orbax checkpoints: round trips, resharded restores, and the corrupt-step fallbacks."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from conftest import spmd_env

from spmd import checkpoint as ckpt
from spmd import cli
from spmd import params as param_lib
from spmd.checkpoint import restore as ckpt_restore
from spmd.checkpoint import verify as ckpt_verify
from spmd.errors import SpmdError
from spmd.layout import Layout
from spmd.models import get_model
from spmd.train import optim
from spmd.train.state import TrainState, abstract_state, state_shardings

OVERRIDES = (("n_layers", "2"), ("d_model", "64"))
CONFIG = {"model": "gpt-tiny", "overrides": [list(kv) for kv in OVERRIDES], "mesh": "fsdp=8"}


def _model():
    return get_model("gpt-tiny", dict(OVERRIDES))


def _opt():
    return optim.make_optimizer(optim.OptimConfig())[0]


def _layout(spec="fsdp=8", devices=8):
    return Layout.make(spec, devices=jax.devices()[:devices])


def _target(layout=None):
    """The abstract TrainState a restore fills, with `layout`'s shardings."""
    model, opt = _model(), _opt()
    return abstract_state(model, opt, state_shardings(model, opt, layout or _layout()))


def _placed_state(model, opt, layout, seed=0):
    """A TrainState on its shardings, from numpy: JAX's random init costs many compiles."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda p: (p, opt.init(p)), param_lib.abstract(model.specs()))
    params, opt_state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    state = TrainState(step=np.int32(0), params=params, opt_state=opt_state)
    return jax.device_put(state, state_shardings(model, opt, layout))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1..3 saved asynchronously on fsdp=8, each with distinct parameters."""
    directory = str(tmp_path_factory.mktemp("ckpt") / "run")
    model, opt = _model(), _opt()
    layout = _layout()
    saver = ckpt.Checkpointer(directory, every=1, keep=5)
    states = {}
    for step in (1, 2, 3):
        state = _placed_state(model, opt, layout, seed=step)
        states[step] = jax.device_get(state.params)
        saver.save(step, state, {"loader": {"next_batch": step}, "rng": [0, step]}, CONFIG)
    saver.wait()
    saver.close()
    return directory, states, state


def _copy(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / "copy")


def _largest_data_file(step_dir: Path) -> Path:
    files = [f for f in (step_dir / "params").rglob("*") if f.is_file() and "/d/" in str(f)]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("spec, devices", [("data=2,tensor=4", 8), ("fsdp=8", 8), ("data=1", 1)])
def test_restore_reshards_onto_any_mesh(saved, spec, devices):
    directory, states, _ = saved
    target = _target(_layout(spec, devices))
    step, state, meta, config = ckpt.restore_train_state(directory, target)
    assert step == 3 and int(state.step) == 3
    assert meta["loader"] == {"next_batch": 3} and meta["rng"] == [0, 3]
    assert config == CONFIG
    # Every array lands directly in the target sharding, with the saved values.
    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state))
    chex.assert_trees_all_equal(
        shardings, jax.tree.map(lambda x: x.sharding, (target.params, target.opt_state))
    )
    chex.assert_trees_all_equal(jax.device_get(state.params), states[3])


def test_restore_params_and_run_config(saved):
    directory, states, _ = saved
    config = ckpt.load_run_config(directory)
    model = get_model(config["model"], dict(config["overrides"]))
    params = ckpt.restore_params(directory, model, _layout("tensor=2", 2), step=2)
    chex.assert_trees_all_equal(jax.device_get(params), states[2])
    assert params["head"].sharding.mesh.shape["tensor"] == 2
    assert ckpt.latest_valid_step(directory) == 3


def test_empty_step_folder_is_ignored(saved, tmp_path, capsys):
    directory = _copy(saved[0], tmp_path)
    (directory / "7").mkdir()
    assert ckpt.all_steps(directory) == [1, 2, 3, 7]
    assert ckpt.latest_valid_step(directory) == 3
    step, *_ = ckpt.restore_train_state(directory, _target())
    assert step == 3
    assert "step 7" in capsys.readouterr().err


def test_truncated_data_file_falls_back_to_the_previous_step(saved, tmp_path, capsys):
    directory = _copy(saved[0], tmp_path)
    victim = _largest_data_file(directory / "3")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    assert ckpt.step_problem(directory, 3) is None  # the metadata alone looks whole
    assert "reading it failed" in ckpt.verify_step(directory, 3)
    assert ckpt.verify_step(directory, 2) is None
    step, state, _, _ = ckpt.restore_train_state(directory, _target())
    assert step == 2
    chex.assert_trees_all_equal(jax.device_get(state.params), saved[1][2])
    err = capsys.readouterr().err
    assert "step 3" in err and "falling back to step 2" in err and "Traceback" not in err


def test_no_valid_step_is_one_clear_error(saved, tmp_path):
    directory = _copy(saved[0], tmp_path)
    for step in (1, 2, 3):
        (directory / str(step) / "_CHECKPOINT_METADATA").unlink()
    target = _target()
    with pytest.raises(SpmdError, match="holds no valid checkpoint") as e:
        ckpt.restore_train_state(directory, target)
    assert "\n" not in str(e.value)
    with pytest.raises(SpmdError, match="does not exist"):
        ckpt.restore_params(str(tmp_path / "nowhere"), _model(), _layout())
    assert ckpt.restore_train_state(str(tmp_path / "nowhere"), target) is None


def test_keep_limits_the_steps_on_disk(saved, tmp_path):
    state = saved[2]
    saver = ckpt.Checkpointer(str(tmp_path / "k"), every=2, keep=2, async_save=False)
    assert [s for s in range(1, 7) if saver.due(s)] == [2, 4, 6]
    for step in (2, 4, 6):
        saver.save(step, state, {"loader": {"next_batch": step}}, CONFIG)
    saver.close()
    assert ckpt.all_steps(str(tmp_path / "k")) == [4, 6]


def test_nothing_is_pickled(saved):
    """The JSON items are plain JSON, and no file holds a pickle stream."""
    root = Path(saved[0]) / "3"
    assert json.loads((root / "config" / "metadata").read_text()) == CONFIG
    for f in root.rglob("*"):
        if f.is_file():
            assert f.read_bytes()[:2] not in (b"\x80\x03", b"\x80\x04", b"\x80\x05"), f


def _info(directory, *flags) -> dict:
    return {r["step"]: r for r in _info_json(directory, *flags)["steps"]}


def _info_json(directory, *flags) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["checkpoint", "info", str(directory), "--json", *flags]) == 0
    return json.loads(out.getvalue())


def test_checkpoint_info_command(saved, tmp_path, capsys):
    directory = _copy(saved[0], tmp_path)
    (directory / "9").mkdir()
    victim = _largest_data_file(directory / "3")
    victim.write_bytes(victim.read_bytes()[:100])
    # By default only the metadata is read: fast, and blind to the truncated file.
    quick = _info(directory)
    assert {s: r["problem"] is None for s, r in quick.items()} == {
        1: True,
        2: True,
        3: True,
        9: False,
    }
    assert _info(directory, "--quick") == quick  # the old flag still works
    info = _info_json(directory, "--verify")
    valid = {r["step"]: r["problem"] is None for r in info["steps"]}
    assert valid == {1: True, 2: True, 3: False, 9: False}
    assert "reading it failed" in info["steps"][2]["problem"]
    assert info["latest_valid"] == 2 and info["config"]["model"] == "gpt-tiny"
    assert all(r["bytes"] > 0 for r in info["steps"] if r["step"] != 9)
    assert cli.main(["checkpoint", "info", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("kind", [MemoryError, PermissionError])
def test_info_verify_that_cannot_read_says_so_and_marks_nothing_invalid(
    saved, tmp_path, capsys, monkeypatch, kind
):
    """Verifying a valid step ran out of memory (or was refused): no verdict on the step."""
    directory = _copy(saved[0], tmp_path)

    def read(item_dir):
        if item_dir.parent.name == "3":
            raise kind(errno.ENOMEM if kind is MemoryError else errno.EACCES, "no luck")
        return original(item_dir)

    original = ckpt_verify.read_every_array
    monkeypatch.setattr(ckpt_verify, "read_every_array", read)
    rows = _info(directory, "--verify")
    assert [rows[s]["problem"] for s in (1, 2, 3)] == [None, None, None]
    assert rows[3]["unverified"].startswith("out of memory" if kind is MemoryError else "perm")
    assert rows[2]["unverified"] is None and rows[2]["verified"]
    assert cli.main(["checkpoint", "info", str(directory), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "could not verify: " in out and "INVALID" not in out
    assert "2 valid, 1 not verified" in out


def _raised(inner: BaseException, wrap: bool = True) -> BaseException:
    """`inner` as orbax hands it on: raised inside a bare Exception about the array index."""
    if not wrap:
        return inner
    try:
        try:
            raise inner
        except BaseException as e:
            raise Exception("Encountered error while reading array index: (slice(0, 2, 1),)") from e
    except Exception as outer:
        return outer


TS = 'Error reading "1.0.mu.embed/0.0" in OCDBT database at local file "/c/3/opt_state/"'
NOT_CORRUPTION = {  # failures that say nothing against the step: stop, rename nothing
    "MemoryError": (MemoryError(), "out of memory"),
    "xla-oom": (
        jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 96.00MiB."),
        "out of memory",
    ),
    "tensorstore-oom": (_raised(ValueError(f"RESOURCE_EXHAUSTED: {TS}")), "out of memory"),
    "PermissionError": (PermissionError(errno.EACCES, "Permission denied", "x"), "permission"),
    "ts-permission": (_raised(ValueError(f"PERMISSION_DENIED: {TS}")), "permission denied"),
    "EIO": (OSError(errno.EIO, "Input/output error"), "filesystem error"),
    "ESTALE": (_raised(OSError(errno.ESTALE, "Stale file handle")), "filesystem error"),
    "timeout": (TimeoutError("timed out"), "filesystem error"),
    "ts-timeout": (_raised(ValueError(f"DEADLINE_EXCEEDED: {TS}")), "timed out"),
    "ts-unavailable": (_raised(ValueError(f"UNAVAILABLE: {TS}")), "unavailable"),
    "ts-EIO": (
        _raised(ValueError(f"FAILED_PRECONDITION: {TS}: [OS error 5: Input/output error]")),
        "filesystem error",
    ),
    "unforeseen": (RuntimeError("something nobody foresaw"), "unexpected error"),
}
CORRUPTION = {
    "truncated": _raised(ValueError(f"OUT_OF_RANGE: {TS}: Requested byte range [9, 99)")),
    "data-loss": _raised(ValueError(f"DATA_LOSS: {TS}")),
    "undecodable": _raised(ValueError(f"FAILED_PRECONDITION: {TS}: Truncated Zstd stream")),
    "missing-file": FileNotFoundError(errno.ENOENT, "No such file or directory", "x"),
    "bad-json": _raised(json.JSONDecodeError("Expecting value", "{", 1), wrap=False),
}


def _fail_step_3(monkeypatch, error):
    original = ckpt_restore.restore_items

    def restore(ckpt_dir, step, **targets):
        if step == 3:
            raise error
        return original(ckpt_dir, step, **targets)

    monkeypatch.setattr(ckpt_restore, "restore_items", restore)


@pytest.mark.parametrize("name", NOT_CORRUPTION)
def test_a_failure_that_is_not_corruption_stops_and_renames_nothing(
    saved, tmp_path, monkeypatch, capsys, name
):
    error, words = NOT_CORRUPTION[name]
    directory = _copy(saved[0], tmp_path)
    before = sorted(p.name for p in directory.iterdir())
    _fail_step_3(monkeypatch, error)
    target = _target()
    with pytest.raises(SpmdError, match="could not restore checkpoint step 3") as e:
        ckpt.restore_train_state(directory, target, set_aside=True)
    message = str(e.value)
    assert words in message and "left as it was" in message and "\n" not in message
    assert sorted(p.name for p in directory.iterdir()) == before
    assert capsys.readouterr().err == ""  # no fallback warning: it did not fall back


@pytest.mark.parametrize("name", CORRUPTION)
def test_corruption_falls_back_and_names_the_folder_it_sets_aside(
    saved, tmp_path, monkeypatch, capsys, name
):
    directory = _copy(saved[0], tmp_path)
    _fail_step_3(monkeypatch, CORRUPTION[name])
    target = _target()
    step, *_ = ckpt.restore_train_state(directory, target, set_aside=True)
    assert step == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "step 3" in err[0] and "set aside as 3.invalid" in err[0]
    assert ckpt.set_aside_newer(directory, step) == ["3.invalid"]
    assert ckpt.all_steps(directory) == [1, 2]


@pytest.mark.slow
def test_ckpt_cost_experiment_runs_tiny(tmp_path, env):
    (tmp_path / "d.txt").write_text("".join(f"line {i} of text\n" for i in range(3000)))
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.ckpt_cost", "--model", "gpt-tiny", "--set",
         "n_layers=1,d_model=64", "--mesh", "fsdp=2", "--devices", "2", "--steps", "6",
         "--every", "2", "--batch", "4", "--seq", "32", "--data", str(tmp_path / "d.txt"),
         "--out", str(out)],
        capture_output=True, text=True, env=spmd_env(env), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert results["async"]["saves"] == results["sync"]["saves"] == 3
    assert all(r["blocked_s"] > 0 and r["checkpoint_mb"] > 0 for r in results.values())
    assert "an async save blocks the loop" in done.stdout
