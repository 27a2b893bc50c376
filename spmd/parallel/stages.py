"""What every pipeline schedule shares: the axis, the microbatches, the stage-ready
parameters and the shard_map specs (spmd/parallel/pipeline.py has the overview)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spmd.models import gpt
from spmd.models.loss import split_rows
from spmd.rules import constrain, current_context

AXIS = "stage"


def mesh():
    return current_context().mesh


def stages() -> int:
    ctx = current_context()
    return int(ctx.mesh.shape[AXIS]) if ctx is not None else 1


def microbatched(batch, m: int):
    """(B, t) token arrays -> (M, B/M, t), strided so no rows cross devices (as grad accum)."""
    return {k: constrain(split_rows(x, m), (None, "batch", "length")) for k, x in batch.items()}


def layer_axes(cfg: gpt.GPTConfig):
    return jax.tree.map(
        lambda s: s.axes, gpt.param_specs(cfg)["layers"], is_leaf=lambda x: hasattr(x, "axes")
    )


def prepare(params, cfg: gpt.GPTConfig, n_stages: int, virtual: int):
    """The parameters as the stages consume them: layer matrices cast to the compute dtype
    and, for V > 1, the stack reordered so that stage s's contiguous shard holds virtual
    stages s, S+s, ... . The reorder moves (V-1)/V of the layer weights across `stage` each
    step (and their gradients back): the price of keeping checkpoints in canonical order."""
    params = gpt.in_compute_dtype(params, cfg)
    if virtual == 1:
        return params

    def reorder(w, axes):
        chunks = w.reshape(virtual, n_stages, -1, *w.shape[1:])
        return constrain(jnp.swapaxes(chunks, 0, 1).reshape(w.shape), axes)

    layers = jax.tree.map(
        reorder, params["layers"], layer_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )
    return {**params, "layers": layers}


def in_float32(params):
    """The stage-ready parameters as float32 loop inputs, with the dtypes to cast each back
    to where it is used. Read this way, the loop's transposes sum every tick's gradients and
    reduce them over the manual axes in float32: summed in bfloat16 they round on every one
    of the M ticks (and XLA:CPU aborts on a bfloat16 psum inside shard_map)."""
    dtypes = jax.tree.map(lambda w: w.dtype, params)
    return jax.tree.map(lambda w: w.astype(jnp.float32), params), dtypes


def restore_dtypes(tree, dtypes):
    return jax.tree.map(lambda w, dt: w.astype(dt), tree, dtypes)


def param_specs_in(params):
    """shard_map in_specs: the layer stack split over `stage`, everything else whole."""
    specs = {}
    for name, tree in params.items():
        spec = P(AXIS) if name == "layers" else P()
        specs[name] = jax.tree.map(lambda _, spec=spec: spec, tree)
    return specs


def embed_all(params, tokens_mbt, cfg: gpt.GPTConfig):
    """Every microbatch's embedding (M, b, t, d), one microbatch at a time."""
    return jax.lax.map(lambda tok: gpt.embed(params, tok, cfg), tokens_mbt)


def manual_axes() -> tuple[str, ...]:
    """The axes the schedules split by hand: `stage`, and `data` when it splits the batch.
    `data` replicates every parameter, so each data slice can sum its own gradients over
    all the ticks and reduce them once at the end; left automatic, XLA all-reduces the
    gradients over `data` on every tick."""
    ctx = current_context()
    if ctx.mesh.shape["data"] > 1 and "data" in ctx.rules.mesh_axes("batch")[:1]:
        return (AXIS, "data")
    return (AXIS,)


def batch_spec(manual) -> P:
    """shard_map in_spec of (M, b, t) microbatched tokens."""
    return P(None, "data") if "data" in manual else P()


def data_slices(manual) -> int:
    return int(mesh().shape["data"]) if "data" in manual else 1


def varying(x, axes=(AXIS,)):
    """Mark values as differing across `axes`: loop carries (as ppermute's output differs
    across stages) and parameters, whose gradients each stage or data slice then keeps to
    itself until one psum at the end (an implicit psum would run on every tick)."""

    def cast(a):
        for axis in axes:
            if axis not in jax.typeof(a).manual_axis_type.varying:
                a = jax.lax.pcast(a, axis, to="varying")
        return a

    return jax.tree.map(cast, x)


def chunk(layers, v, virtual: int):
    """The v-th of the `virtual` chunks of this stage's local layers."""
    return jax.tree.map(
        lambda w: jax.lax.dynamic_index_in_dim(
            w.reshape(virtual, -1, *w.shape[1:]), v, keepdims=False
        ),
        layers,
    )


def put(buffer, i, value):
    return jax.lax.dynamic_update_index_in_dim(buffer, value, i, 0)
