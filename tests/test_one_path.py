"""One path from (model, layout) to the compiled step: the trainer and `spmd explain` compile
the same program, report the same MFU, and record the same layout; the CLI adds nothing of
its own; the modules keep honest boundaries."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import spmd
from spmd import checkpoint as ckpt
from spmd.cli import build_parser
from spmd.commands.train import config_from_args
from spmd.compiler import cost, report
from spmd.errors import SpmdError
from spmd.rules import Rules
from spmd.train import monitor, trainer
from spmd.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = (("n_layers", "2"), ("d_model", "64"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) + "\n")
    return str(path)


def tiny_config(data, **kw) -> TrainConfig:
    base = dict(model="gpt-tiny", overrides=TINY, mesh="fsdp=4,tensor=2", batch=8, seq=32,
                data=data, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_explain_compiles_what_train_runs_and_reports_the_same_mfu(data):
    cfg = tiny_config(data, remat="full")
    run = trainer.setup(cfg)
    trained = report.stats_from_compiled(run.step_fn)
    rep = report.explain("gpt-tiny", "fsdp=4,tensor=2", 8, 32, overrides=dict(TINY), remat="full")
    assert trained.memory == rep.stats.memory
    assert [c.to_json() for c in trained.collectives] == [
        c.to_json() for c in rep.stats.collectives
    ]
    assert trained.collectives and trained.flops_per_device == rep.stats.flops_per_device

    # The progress bar's MFU and the report's are one formula with one peak: at equal step
    # times they agree (both are model FLOPs / step time / the cpu profile's peak).
    flops = cost.model_flops_per_step(run.program.model, cfg.batch, cfg.seq)
    mon = monitor.Monitor(cfg, 0, 256, flops, cost.get_hardware("cpu"), enabled=False)
    row = mon.fetch(1, {"loss": 1.0, "grad_norm": 1.0, "param_norm": 1.0})
    predicted = rep.prediction
    assert row["mfu"] * row["step_time_s"] == pytest.approx(
        predicted.mfu * predicted.step_time_s, rel=1e-9
    )


@pytest.mark.slow
def test_the_layout_is_recorded_in_checkpoints_and_the_metrics_file(data, tmp_path):
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    cfg = tiny_config(data, steps=2, metrics_file=str(metrics), ckpt_dir=str(ck), ckpt_every=2)
    trainer.run(cfg, rules=Rules.default({"vocab": None}))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    want = {"mesh": "fsdp=4,tensor=2", "rules": {**Rules().to_json(), "vocab": []}}
    assert {k: rows[0][k] for k in want} == want
    assert [r["step"] for r in rows] == [1, 2] and "rules" not in rows[1]
    saved = ckpt.load_run_config(str(ck))
    assert saved["mesh"] == want["mesh"] and saved["rules"] == want["rules"]


def parse_train(*argv) -> TrainConfig:
    parser, _ = build_parser()
    return config_from_args(parser.parse_args(["train", *argv]))


def test_train_flags_take_their_defaults_from_the_config():
    assert parse_train() == TrainConfig()
    cfg = parse_train("--grad-accum", "2", "--no-progress", "--sync-ckpt", "--set", "d_ff=96")
    assert cfg == dataclasses.replace(
        TrainConfig(), grad_accum=2, progress=False, async_ckpt=False, overrides=(("d_ff", "96"),)
    )


def test_set_remat_is_not_overruled_by_the_flag():
    assert parse_train("--set", "remat=full").build_model().cfg.remat == "full"
    assert parse_train("--remat", "dots").build_model().cfg.remat == "dots"
    assert parse_train().build_model().cfg.remat == "none"
    with pytest.raises(SpmdError, match="--remat dots contradicts --set remat=full"):
        parse_train("--set", "remat=full", "--remat", "dots").build_model()
    with pytest.raises(SpmdError, match="--dtype float32 contradicts --set compute_dtype"):
        parse_train("--set", "compute_dtype=bfloat16", "--dtype", "float32").build_model()


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Module-level imports, those under `if TYPE_CHECKING:` included."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            out += [n for n in node.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return out


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in sorted([*ROOT.glob("spmd/**/*.py"), *ROOT.glob("experiments/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spmd"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                offenders += [f"{_module(path)}: {node.module}.{name}" for name in private]
    assert not offenders


def test_spmd_modules_import_each_other_without_cycles():
    paths = {_module(p): p for p in ROOT.glob("spmd/**/*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in paths else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        # A package's __init__ is imported with its modules; only sibling edges count.
        graph[name] = {t for t in targets if t in paths and t != name and not name.startswith(t)}
    visiting, done = [], set()

    def visit(node):
        assert node not in visiting, "import cycle: " + " -> ".join([*visiting, node])
        if node in done:
            return
        visiting.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_a_layout_carries_mesh_and_rules_and_refuses_unknown_logical_axes():
    layout = spmd.Layout.make("fsdp=4,tensor=2", Rules.default({"vocab": None}))
    assert layout.spec == "fsdp=4,tensor=2" and layout.devices == 8
    assert layout.to_json()["rules"]["vocab"] == [] and layout.batch_shards == 4
    with pytest.raises(SpmdError, match="logical axis 'heds' has no rule"):
        layout.sharding(("embed", "heds"), (64, 8))
    abstract = spmd.Layout.abstract({"data": 64, "tensor": 4})
    assert abstract.devices == 256 and str(abstract.pspec(("batch", "mlp"))) == str(
        spmd.Layout.make("data=2,tensor=4").pspec(("batch", "mlp"))
    )
