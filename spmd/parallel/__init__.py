"""Parallel forms XLA's partitioner does not produce by itself, written with `jax.shard_map`
(the pipeline over `stage`, ring attention over `sequence`), and local SGD / DiLoCo, which
steps away from one global synchronous step."""
