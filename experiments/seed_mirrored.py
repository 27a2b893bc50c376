"""The seed document's MirroredStrategy example, reproduced with spmd.

The seed trains Dense(10, relu, input 10) -> Dense(1) with Adam(lr=0.1) on MSE, on
x, y ~ N(0, 1) of 1000 rows, for 10 epochs at Keras' default batch of 32. Mirrored
replicas each take a slice of the batch; their losses are summed (scaled by the global
batch) and one global gradient step updates the shared parameters. Here that is a
data-parallel mesh over 8 simulated CPU devices, checked against the same run on one.

Run: `make seed` (or `python -m experiments.seed_mirrored`).
"""

from __future__ import annotations

import spmd

if __name__ == "__main__":
    spmd.simulate_cpu_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from spmd.compiler.program import TrainProgram  # noqa: E402
from spmd.models import mlp_model  # noqa: E402

ROWS, FEATURES, BATCH, LR = 1000, 10, 32, 0.1


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    y = rng.standard_normal((ROWS, 1)).astype(np.float32)
    return x, y


def fit(layout, x, y, epochs: int, seed: int = 0, verbose: bool = True):
    """Keras-style `fit`: shuffled epochs of batches of 32 (the last one smaller)."""
    model = mlp_model()
    # Keras' Adam: beta_1=0.9, beta_2=0.999, epsilon=1e-7.
    opt = optax.adam(LR, eps=1e-7)
    state = None
    steps = {}  # one compiled step per batch shape (32, and the remainder)
    history = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        total = 0.0
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            batch = {"x": x[idx], "y": y[idx]}
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
            key = len(idx)
            if key not in steps:
                program = TrainProgram(model, layout, spec, opt, lambda _: LR)
                steps[key] = program.compile()
                if state is None:
                    state = program.init_state(jax.random.key(seed))
            sh = steps[key].program.batch_shardings
            batch = {k: jax.device_put(v, sh[k]) for k, v in batch.items()}
            state, metrics = steps[key](state, batch)
            total += float(metrics["loss"]) * len(idx)
        history.append(total / len(x))
        if verbose:
            n_batches = -(-len(x) // BATCH)
            print(f"Epoch {epoch + 1}/{epochs}\n{n_batches}/{n_batches} - loss: {history[-1]:.4f}")
    return history, jax.device_get(state.params)


def run(epochs: int = 10, verbose: bool = True) -> dict:
    x, y = make_data()
    devices = jax.devices()
    mirrored = spmd.Layout.make({"data": len(devices)}, devices=devices)
    single = spmd.Layout.make({"data": 1}, devices=devices[:1])
    if verbose:
        print(f"Data parallel over {len(devices)} devices (mesh data={len(devices)}):")
    losses, params = fit(mirrored, x, y, epochs, verbose=verbose)
    ref_losses, ref_params = fit(single, x, y, epochs, verbose=False)
    loss_diff = float(np.max(np.abs(np.subtract(losses, ref_losses))))
    pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True))
    param_diff = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    scale = max(float(np.max(np.abs(b))) for _, b in pairs)
    if verbose:
        print(
            f"largest difference from the same run on 1 device: loss {loss_diff:.3g}, "
            f"parameters {param_diff:.3g} (relative to the largest parameter: "
            f"{param_diff / scale:.3g}; float32 epsilon is {np.finfo(np.float32).eps:.3g})"
        )
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "loss_diff": loss_diff,
        "param_diff": param_diff,
        "param_scale": scale,
    }


if __name__ == "__main__":
    run()
