"""How many layers each iteration of the layer scan runs (`GPTConfig.scan_unroll`).

`lax.scan` over the stacked layers keeps compile time flat however deep the model is, but
on XLA:CPU the loop costs throughput at small depth: gpt-small's one-device step ran at 0.84x
plain JAX scanned (`python -m experiments.bench --model gpt-small --set scan_unroll=1`) and
0.96x unrolled (`make bench`), and `make bench`'s CPU case (4 layers) lost about 6%, while
compiling no slower. So `scan_unroll=0` (auto, the default) unrolls stacks of up to
AUTO_MAX_LAYERS on CPU and scans one layer at a time elsewhere and deeper; any positive value
is taken as given.

Auto keeps the scan wherever unrolling would change what the step holds: under remat,
XLA's CSE merges the recomputed forward with the original once the layers are unrolled
(`prevent_cse=False` is only safe inside a scan), so remat silently stops saving memory; and
where weights are gathered for use (FSDP: a weight axis on a mesh axis that also splits the
batch), the unrolled backward keeps the forward's gathered weights instead of gathering
again. tests/test_remat.py and test_explain.py measure both.
"""

from __future__ import annotations

import jax

from spmd.rules import current_context

AUTO_MAX_LAYERS = 8  # the deepest stack auto unrolls on CPU (gpt-small has 6 layers)
# The logical axes of weight dimensions (gpt.param_specs); a mesh axis shared with `batch`
# shards a weight that every step gathers.
WEIGHT_AXES = ("embed", "heads", "kv_heads", "mlp", "vocab")


def layer_unroll(scan_unroll: int, n_layers: int, remat: str = "none") -> int:
    """The `unroll` argument of the layer scan for the config's `scan_unroll`, depth and
    remat policy."""
    if scan_unroll:
        return scan_unroll
    cpu = platform() == "cpu"
    if cpu and n_layers <= AUTO_MAX_LAYERS and remat == "none" and not gathers_weights():
        return n_layers
    return 1


def gathers_weights() -> bool:
    """Whether the traced layout splits weights over a mesh axis that also splits the batch."""
    ctx = current_context()
    if ctx is None:
        return False
    batch = set(ctx.rules.mesh_axes("batch"))
    weights = {a for name in WEIGHT_AXES for a in ctx.rules.mesh_axes(name)}
    return any(ctx.mesh.shape[a] > 1 for a in batch & weights)


def platform() -> str:
    """The platform of the layout being traced, else JAX's default backend."""
    ctx = current_context()
    if ctx is not None and isinstance(ctx.mesh, jax.sharding.Mesh):
        return ctx.mesh.devices.flat[0].platform
    return jax.default_backend()
