"""Choosing the next id: greedy, temperature, top-k and top-p, and when a row stops."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spmd.errors import SpmdError

NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen and when a row stops. temperature 0 is greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    eos_id: int | None = None
    stop: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row
    vocab_limit: int | None = None  # ids >= this (vocabulary padding) are never sampled

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SpmdError(f"--max-new-tokens={self.max_new_tokens} must be a positive integer")
        if not self.temperature >= 0:  # also rejects NaN
            raise SpmdError(f"--temperature={self.temperature} must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SpmdError(f"--top-k={self.top_k} must be a non-negative integer")
        if not 0 < self.top_p <= 1:
            raise SpmdError(f"--top-p={self.top_p} must be in (0, 1]")
        if any(len(s) == 0 for s in self.stop):
            raise SpmdError("a stop sequence must not be empty")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise SpmdError(f"vocab_limit={self.vocab_limit} must be positive")

    @property
    def stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=1)


def sample(logits_bv, key, sc: SamplingConfig):
    """Greedy at temperature 0; else top-k, then top-p (nucleus), then a categorical draw."""
    logits = logits_bv.astype(jnp.float32)
    if sc.vocab_limit is not None and sc.vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < sc.vocab_limit, logits, NEG)
    if sc.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sc.temperature
    if 0 < sc.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sc.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG, logits)
    if sc.top_p < 1:
        sorted_bv = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_bv, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
        # before it is still short of top_p (so the most likely token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sc.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def stop_table(sc: SamplingConfig):
    """Stop sequences right-aligned in (n_stop, m); -1 marks "any token" on the left."""
    m = sc.stop_len
    rows = [[-1] * (m - len(s)) + list(s) for s in sc.stop]
    return jnp.asarray(rows or [[-1] * m], jnp.int32), bool(rows)
