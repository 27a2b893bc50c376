"""Inference: a sharded KV cache, a decode loop on the devices, and the host driver.

sampling.py   SamplingConfig and `sample` (greedy, temperature, top-k, top-p, stops)
decode.py     the KV cache, `prefill` and `decode_step`, from gpt.py's building blocks
loop.py       `start` (prefill + first id) and `advance` (the while_loop)
generator.py  `Generator`: batching, per-shape compiles, donation, streaming, timings
"""

from spmd.inference.decode import (
    CACHE_AXES,
    KVCache,
    decode_step,
    init_cache,
    prefill,
    unstack_layers,
)
from spmd.inference.generator import Generation, Generator
from spmd.inference.loop import DecodeState, advance, start
from spmd.inference.sampling import SamplingConfig, sample

__all__ = [
    "CACHE_AXES",
    "DecodeState",
    "Generation",
    "Generator",
    "KVCache",
    "SamplingConfig",
    "advance",
    "decode_step",
    "init_cache",
    "prefill",
    "sample",
    "start",
    "unstack_layers",
]
