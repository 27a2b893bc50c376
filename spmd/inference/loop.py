"""The decode loop: prefill and a first id, then a while_loop that stops when all rows are done.

Python dispatches once per chunk of ids (once per generation unless streaming), not per id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from spmd.inference.decode import KVCache, decode_step, prefill
from spmd.inference.sampling import SamplingConfig, sample, stop_table
from spmd.models import gpt


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries. Row i's next input sits in cache slot T+step-1."""

    cache: KVCache
    tokens: jax.Array  # (b, n) generated ids; -1 once a row is done
    last: jax.Array  # (b,) the token to feed next
    tail: jax.Array  # (b, m) the last m generated ids, for stop sequences
    lengths: jax.Array  # (b,) ids generated per row, counting the one that ended it
    done: jax.Array  # (b,)
    step: jax.Array  # () ids generated so far (every row)
    pad: jax.Array  # (b,) left padding of each prompt
    key: jax.Array

    @property
    def prompt_len(self) -> int:
        return self.cache.k.shape[3] - self.tokens.shape[1] + 1


def _record(state: DecodeState, tok_b, sc: SamplingConfig) -> DecodeState:
    """Write this step's ids, and mark rows that hit EOS or a stop sequence as done."""
    live = ~state.done
    tail = jnp.concatenate([state.tail[:, 1:], tok_b[:, None]], axis=1)
    ended = jnp.zeros_like(live)
    if sc.eos_id is not None:
        ended = tok_b == sc.eos_id
    table, any_stop = stop_table(sc)
    if any_stop:
        match = (table[None] == -1) | (table[None] == tail[:, None])  # (b, n_stop, m)
        ended = ended | jnp.any(jnp.all(match, axis=-1), axis=-1)
    column = jnp.where(live, tok_b, -1)[:, None]
    return state.replace(
        tokens=jax.lax.dynamic_update_slice(state.tokens, column, (0, state.step)),
        last=tok_b,
        tail=tail,
        lengths=state.lengths + live.astype(jnp.int32),
        done=state.done | ended,
        step=state.step + 1,
    )


def start(params, cache: KVCache, tokens_bt, pad_b, key, cfg: gpt.GPTConfig, sc: SamplingConfig):
    """Prefill, then draw each row's first new id. Returns the loop's state (step 1)."""
    b = tokens_bt.shape[0]
    logits, cache = prefill(params, cache, tokens_bt, pad_b, cfg)
    n = cache.k.shape[3] - tokens_bt.shape[1] + 1
    state = DecodeState(
        cache=cache,
        tokens=jnp.full((b, n), -1, jnp.int32),
        last=jnp.zeros((b,), jnp.int32),
        tail=jnp.full((b, sc.stop_len), -2, jnp.int32),  # -2 matches no stop id
        lengths=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        step=jnp.zeros((), jnp.int32),
        pad=pad_b,
        key=key,
    )
    return _record(state, sample(logits, jax.random.fold_in(key, 0), sc), sc)


def advance(params, state: DecodeState, limit, cfg: gpt.GPTConfig, sc: SamplingConfig):
    """Decode until `limit` ids per row, or until every row is done, inside one while_loop."""
    t = state.prompt_len

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        logits, cache = decode_step(params, s.cache, s.last, t + s.step - 1, s.pad, cfg)
        tok = sample(logits, jax.random.fold_in(s.key, s.step), sc)
        return _record(s.replace(cache=cache), tok, sc)

    return jax.lax.while_loop(cond, body, state)
