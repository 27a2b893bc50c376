"""Parity, the heart of the suite: every layout trains exactly like one device.

A few steps of gpt-tiny on fixed batches, on each mesh, with remat off and full and with
grad-accum 1 and 4. Per-step losses and final parameters must match the single-device run
within 1e-5 relative (float32).
"""

import functools

import jax
import numpy as np
import pytest

import spmd
from spmd.compiler.program import TrainProgram
from spmd.models import get_model
from spmd.train import optim

BATCH, SEQ, STEPS = 32, 16, 3
MESHES = [
    ("data=8", 8),
    ("fsdp=8", 8),
    ("tensor=4", 4),
    ("fsdp=4,tensor=2", 8),
    ("data=2,fsdp=2,tensor=2", 8),
]
# Adam divides each gradient entry by |g| + eps. Entries that cancel to ~1e-8 carry their
# float32 rounding (~1e-11 absolute, which differs with the summation order of each layout)
# into updates that differ by up to 1e-5 of lr; eps=1e-8 let a handful of such entries push
# a tensor past 1e-5 relative after one step. eps=1e-6 caps that gain at lr/eps, so the
# comparison measures the layouts rather than Adam's conditioning on near-zero gradients.
OPTIM = optim.OptimConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS, eps=1e-6)
CONFIGS = [("none", 1), ("full", 1), ("none", 4), ("full", 4)]


def fixed_batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (STEPS, BATCH, SEQ + 1)).astype(np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def train(mesh_spec: str, n_devices: int, remat: str, grad_accum: int, **fields):
    program = tiny_program(mesh_spec, n_devices, remat, grad_accum, **fields)
    step = program.compile()
    state = program.init_state(jax.random.key(0))
    shardings = program.batch_shardings
    losses = []
    for batch in fixed_batches():
        batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)


def tiny_program(mesh_spec, n_devices, remat="none", grad_accum=1, **fields) -> TrainProgram:
    layout = spmd.Layout.make(mesh_spec, devices=jax.devices()[:n_devices])
    model = get_model("gpt-tiny", {"remat": remat, **fields})
    return TrainProgram.for_tokens(
        model, layout, BATCH, SEQ, grad_accum=grad_accum, optimizer=OPTIM
    )


@functools.cache
def reference(remat: str, grad_accum: int):
    return train("data=1", 1, remat, grad_accum)


def assert_parity(got, want):
    losses, params = got
    ref_losses, ref_params = want
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=0)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(params),
        jax.tree.leaves(ref_params),
        strict=True,
    ):
        # Relative to each tensor's norm: elementwise ratios blow up on entries near zero.
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < 1e-5, f"{jax.tree_util.keystr(path[0])}: relative difference {rel:.2e}"


@pytest.mark.parametrize("mesh_spec, n_devices", MESHES, ids=[m for m, _ in MESHES])
def test_parity_plain(mesh_spec, n_devices):
    assert_parity(train(mesh_spec, n_devices, "none", 1), reference("none", 1))


@pytest.mark.slow
@pytest.mark.parametrize("remat, grad_accum", CONFIGS[1:], ids=["remat", "accum4", "remat-accum4"])
@pytest.mark.parametrize("mesh_spec, n_devices", MESHES, ids=[m for m, _ in MESHES])
def test_parity_remat_and_accumulation(mesh_spec, n_devices, remat, grad_accum):
    assert_parity(train(mesh_spec, n_devices, remat, grad_accum), reference(remat, grad_accum))


def test_accumulation_matches_one_big_batch():
    """Mean of equal microbatch means is the batch mean: accum 4 == accum 1 on one device."""
    assert_parity(reference("none", 4), reference("none", 1))


def test_training_moves_the_parameters_far_beyond_the_tolerance():
    """Guards the parity tests against comparing runs that barely move."""
    losses, params = reference("none", 1)
    assert np.all(np.diff(losses) < 0)
    start = jax.device_get(tiny_program("data=1", 1).init_state(jax.random.key(0)).params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start), strict=True):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) > 100 * 1e-5


@pytest.mark.parametrize("mesh_spec, n_devices", [("tensor=4", 4), ("data=2,tensor=4", 8)])
def test_kv_heads_replicate_when_tensor_exceeds_them(mesh_spec, n_devices):
    """8 query heads over 2 KV heads on tensor=4: the query heads split 4 ways, each KV head
    is replicated on the 2 ranks that use it, and training matches one device."""
    got = train(mesh_spec, n_devices, "none", 1, n_kv_heads=2)
    assert_parity(got, train("data=1", 1, "none", 1, n_kv_heads=2))
    layout = tiny_program(mesh_spec, n_devices, n_kv_heads=2).layout
    assert layout.pspec(("layers", "embed", "kv_heads", None), (4, 128, 2, 16))[2] is None
    assert layout.pspec(("layers", "embed", "heads", None), (4, 128, 8, 16))[2] == "tensor"
