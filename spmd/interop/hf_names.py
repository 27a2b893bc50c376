"""Where each spmd parameter lives in a Hugging Face Llama checkpoint, and how to move a block.

torch's `nn.Linear` stores `(out, in)`; spmd stores `(in, ...out)` with heads split out
(`wq` is `(d, h, k)`, `wo` is `(h, k, d)`), and stacks the layers on a leading axis. So an
HF matrix is our per-layer weight flattened to 2-D at `split` and transposed, nothing else.

Rotary embeddings: HF's `rotate_half` pairs dimension j with j + k/2 of each head (the
"half-split" layout), and so does `gpt.apply_rope` (it splits each head in two halves), so q
and k copy across unpermuted. Checkpoints exported by transformers' Llama conversion script
were permuted into this layout already; only Meta's original checkpoints, which pair dims
(2j, 2j+1), would need the de-interleaving permutation, and they are not read here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: tuple[str, ...]  # the parameter's keys in spmd's tree
    hf: str  # the HF name; `{i}` is the layer for stacked weights
    split: int | None  # our dims [:split] are HF's `in`, [split:] its `out`; None: same layout

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf

    def hf_names(self, n_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(n_layers)] if self.layered else [self.hf]

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        """HF's shape for one of our per-layer shapes."""
        if self.split is None:
            return tuple(ours)
        return (math.prod(ours[self.split :]), math.prod(ours[: self.split]))

    def to_hf(self, block: np.ndarray) -> np.ndarray:
        """Our whole per-layer weight as HF's tensor."""
        if self.split is None:
            return np.ascontiguousarray(block)
        flat = block.reshape(math.prod(block.shape[: self.split]), -1)
        return np.ascontiguousarray(flat.T)

    def read(self, lazy, ours: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """Our block `index` (one layer's dims) read from HF's lazy tensor: only the rows and
        columns that cover it are read."""
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, ours, strict=True))
        if self.split is None:
            return lazy[index]
        groups = (range(self.split), range(self.split, len(ours)))
        spans = [_span(ours, index, g) for g in groups]  # (start, stop) in the flat dim
        hf_block = lazy[slice(*spans[1]), slice(*spans[0])]  # (out, in)
        block = hf_block.T.reshape(
            *_covered(ours, index, groups[0]), *_covered(ours, index, groups[1])
        )
        # The covering rows hold whole trailing dims; cut the trailing slices out of them.
        inner = tuple(
            slice(0, s.stop - s.start) if d == g[0] else s
            for g in groups
            for d, s in zip(g, (index[d] for d in g), strict=True)
        )
        return block[inner]


def _span(shape, index, dims) -> tuple[int, int]:
    first = dims[0]
    rest = math.prod(shape[d] for d in dims[1:])
    return index[first].start * rest, index[first].stop * rest


def _covered(shape, index, dims) -> list[int]:
    first = dims[0]
    return [index[first].stop - index[first].start, *(shape[d] for d in dims[1:])]


def tensor_maps(tie_embeddings: bool) -> list[TensorMap]:
    layer = "model.layers.{i}."
    maps = [
        TensorMap(("embed",), "model.embed_tokens.weight", None),
        TensorMap(("layers", "attn_norm"), layer + "input_layernorm.weight", None),
        TensorMap(("layers", "wq"), layer + "self_attn.q_proj.weight", 1),
        TensorMap(("layers", "wk"), layer + "self_attn.k_proj.weight", 1),
        TensorMap(("layers", "wv"), layer + "self_attn.v_proj.weight", 1),
        TensorMap(("layers", "wo"), layer + "self_attn.o_proj.weight", 2),
        TensorMap(("layers", "mlp_norm"), layer + "post_attention_layernorm.weight", None),
        TensorMap(("layers", "w_gate"), layer + "mlp.gate_proj.weight", 1),
        TensorMap(("layers", "w_up"), layer + "mlp.up_proj.weight", 1),
        TensorMap(("layers", "w_down"), layer + "mlp.down_proj.weight", 1),
        TensorMap(("final_norm",), "model.norm.weight", None),
    ]
    if not tie_embeddings:
        maps.append(TensorMap(("head",), "lm_head.weight", 1))
    return maps


# Buffers some older checkpoints saved; they are recomputed, never read.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
