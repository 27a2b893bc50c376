"""shard_map escape hatches: parallel forms XLA's partitioner does not produce by itself
(the pipeline over `stage`, ring attention over `sequence`)."""
