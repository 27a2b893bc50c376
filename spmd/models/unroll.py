"""How many layers each iteration of the layer scan runs (`GPTConfig.scan_unroll`).

`lax.scan` over the stacked layers keeps compile time flat however deep the model is, but
on XLA:CPU the loop costs throughput at small depth: in `make bench`'s CPU case (4 layers)
the scanned step ran about 6% slower than the same step unrolled, while compiling no slower
(about 4 s either way, one device or eight). So `scan_unroll=0` (auto) unrolls stacks of
up to AUTO_MAX_LAYERS on CPU and scans one layer at a time elsewhere and deeper; any
positive value is taken as given. It is an option, not the default (1): with the layers
unrolled, XLA's CSE undoes remat (`prevent_cse=False` is only safe inside a scan) and FSDP
keeps the gathered weights from the forward pass for the backward, so memory and the
compiler report's gathers change (tests/test_remat.py and test_explain.py saw both).
"""

from __future__ import annotations

import jax

from spmd.rules import current_context

AUTO_MAX_LAYERS = 8  # the deepest stack auto unrolls on CPU (gpt-small has 6 layers)


def layer_unroll(scan_unroll: int, n_layers: int) -> int:
    """The `unroll` argument of the layer scan for the config's `scan_unroll` and depth."""
    if scan_unroll:
        return scan_unroll
    return n_layers if platform() == "cpu" and n_layers <= AUTO_MAX_LAYERS else 1


def platform() -> str:
    """The platform of the layout being traced, else JAX's default backend."""
    ctx = current_context()
    if ctx is not None and isinstance(ctx.mesh, jax.sharding.Mesh):
        return ctx.mesh.devices.flat[0].platform
    return jax.default_backend()
