"""shard_map escape hatches: parallel forms XLA's partitioner does not produce by itself."""
