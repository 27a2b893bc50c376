"""bfloat16 compute casts each weight shard before FSDP gathers it, so the gathers move half
the bytes of float32 ones.

XLA:CPU has no bfloat16 matmul: after partitioning, its backend pipeline widens bf16 dot
operands back to float32, gathers included, so the final CPU program cannot show this. The
program right after SPMD partitioning is what a GPU or TPU backend goes on to compile, so the
test reads that one, dumped by XLA.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import spmd_env

SCRIPT = """
import spmd
spmd.simulate_cpu_devices(8)
from spmd.compiler.program import TrainProgram, build_model
model = build_model("gpt-tiny", {{"n_layers": 2}}, dtype="{dtype}")
TrainProgram.for_tokens(model, spmd.Layout.make("fsdp=8"), 8, 32).compile()
"""
GATHER = re.compile(r"= (\w+)\[([\d,]*)\]\S* all-gather\(.*?op_name=\"([^\"]*)\"")
BYTES = {"f32": 4, "bf16": 2}


def partitioned_gathers(tmp_path: Path, dtype: str) -> list[tuple[str, int, str]]:
    """(element type, bytes, op name) of every all-gather in the partitioned train step."""
    dump = tmp_path / dtype
    flags = f"--xla_dump_to={dump} --xla_dump_hlo_pass_re=spmd-partitioning"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(dtype=dtype)],
        env=spmd_env({"XLA_FLAGS": flags}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (text,) = [
        p.read_text()
        for p in dump.glob("*jit_in_context*after_spmd-partitioning*")
        if "all-gather" in p.read_text()
    ]
    return [
        (kind, BYTES[kind] * math.prod(int(n) for n in shape.split(",") if n), op)
        for kind, shape, op in GATHER.findall(text)
    ]


@pytest.mark.slow
def test_bfloat16_halves_the_fsdp_gathers_of_layer_weights(tmp_path):
    f32 = partitioned_gathers(tmp_path, "float32")
    bf16 = partitioned_gathers(tmp_path, "bfloat16")

    def layer_bytes(gathers):
        return sum(n for _, n, op in gathers if "/layers/" in op or "(layers)" in op)

    assert {kind for kind, _, _ in f32} == {"f32"}
    assert layer_bytes(f32) > 0 and layer_bytes(bf16) == layer_bytes(f32) / 2
    assert all(kind == "bf16" for kind, _, op in bf16 if "layers" in op)
    # The embedding table and the head are cast before their gathers too. One gather stays
    # float32 by design: the head's, for the backward matmul of the logits, which are
    # accumulated in float32 (loss.py's preferred_element_type).
    wide = [(n, op) for kind, n, op in bf16 if kind == "f32"]
    assert len(wide) == 1 and "transpose(jvp(loss))" in wide[0][1], wide
    assert wide[0][0] == 4 * 128 * 384  # d_model x vocab, float32
