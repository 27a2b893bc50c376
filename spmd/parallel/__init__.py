"""Parallel schedules written by hand with `jax.shard_map` (pipeline over `stage`)."""
