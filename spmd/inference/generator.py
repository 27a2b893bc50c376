"""The host side: pad prompts into a batch, compile per shape, stream ids, time each phase."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import numpy as np

from spmd import params as param_lib
from spmd.errors import SpmdError
from spmd.inference.decode import CACHE_AXES, KVCache, decode_rules, init_cache, unstack_layers
from spmd.inference.loop import DecodeState, advance, start
from spmd.inference.sampling import SamplingConfig
from spmd.layout import Layout, sharded_structs
from spmd.models import gpt, moe


@dataclasses.dataclass(frozen=True)
class Generation:
    """Per prompt: the new ids (counting the EOS or stop id that ended it) and why it ended."""

    ids: list[list[int]]
    finish: list[str]  # "eos", "stop" or "length"
    steps: int  # ids generated per row, the decode loop's trip count plus one
    prefill_s: float
    decode_s: float
    compile_s: float


class Generator:
    """Jitted prefill and decode loop for one model on one mesh, with cache and state donated.

    Each (batch, prompt length, new tokens) shape compiles once; prompt lengths round up to
    `bucket` so that prompts of similar length share a compile.
    """

    def __init__(self, model, layout: Layout, sampling: SamplingConfig, bucket: int = 16):
        if not isinstance(model.cfg, gpt.GPTConfig):
            raise SpmdError(f"generation supports the gpt models, not {model.name!r}")
        self.model, self.cfg, self.sc, self.bucket = model, model.cfg, sampling, bucket
        self.layout = Layout(layout.mesh, decode_rules(layout.rules))
        self.param_shardings = unstacked_shardings(model.specs(), self.layout)
        self._compiled: dict[tuple[int, int, int], tuple] = {}
        self._prepare = jax.jit(unstack_layers, out_shardings=self.param_shardings)

    def prepare(self, params):
        """Training's parameters (on any mesh) as this generator's per-layer weights.

        `generate` does this itself when handed stacked parameters; call it once to reuse the
        result across generations (the stacked parameters can then be dropped).
        """
        if isinstance(params["layers"], tuple):
            return jax.device_put(params, self.param_shardings)
        stacked = self.layout.param_shardings(self.model.specs())
        return self._prepare(jax.device_put(params, stacked))

    def shapes(self, lengths: list[int]) -> tuple[int, int, int]:
        """(batch, padded prompt length T, new ids n) for prompts of these lengths.

        The batch rounds up to the mesh's batch split (extra rows are dropped); n stops where
        the longest prompt reaches the model's max_seq_len.
        """
        shards = self.layout.batch_shards
        b = -(-len(lengths) // shards) * shards
        longest = max(lengths)
        t = min(-(-longest // self.bucket) * self.bucket, self.cfg.max_seq_len)
        n = min(self.sc.max_new_tokens, self.cfg.max_seq_len - longest + 1)
        return b, t, n

    def check(self, prompts) -> None:
        if not prompts:
            raise SpmdError("no prompts given")
        limit = self.cfg.max_seq_len
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise SpmdError(f"prompt {i} is empty; give at least one token of text")
            if len(p) > limit:
                raise SpmdError(
                    f"prompt {i} is {len(p)} tokens, longer than the model's max_seq_len={limit}"
                )
            if min(p) < 0 or max(p) >= self.cfg.vocab_size:
                raise SpmdError(f"prompt {i} has ids outside [0, {self.cfg.vocab_size})")

    def compiled(self, b: int, t: int, n: int):
        """(init_cache, start, advance) for this shape, compiled ahead of time once."""
        if (b, t, n) not in self._compiled:
            t0 = time.perf_counter()
            cache_sh, state_sh = self._cache_sharding(b, t + n - 1), self._state_shardings(b, t, n)
            init, begin, step = self._jitted(b, t, n, cache_sh, state_sh)
            cache = sharded_structs(jax.eval_shape(init), cache_sh)
            params = sharded_structs(
                jax.eval_shape(unstack_layers, param_lib.abstract(self.model.specs())),
                self.param_shardings,
            )
            key = jax.eval_shape(lambda: jax.random.key(0))
            rows, tokens = (jax.ShapeDtypeStruct(s, np.int32) for s in ((b,), (b, t)))
            begin_c = begin.lower(params, cache, tokens, rows, key).compile()
            step_c = step.lower(params, begin_c.out_info, np.int32(n)).compile()
            self._compiled[(b, t, n)] = (init, begin_c, step_c, time.perf_counter() - t0)
        return self._compiled[(b, t, n)]

    def _sh(self, axes, shape):
        return self.layout.sharding(axes, shape)

    def _cache_sharding(self, b: int, slots: int) -> KVCache:
        cfg = self.cfg
        sh = self._sh(CACHE_AXES, (cfg.n_layers, b, cfg.n_kv_heads, slots, cfg.head_dim))
        return KVCache(sh, sh)

    def _state_shardings(self, b: int, t: int, n: int) -> DecodeState:
        rows, repl = self._sh(("batch",), (b,)), self._sh((), ())
        return DecodeState(
            cache=self._cache_sharding(b, t + n - 1),
            tokens=self._sh(("batch", None), (b, n)),
            last=rows,
            tail=self._sh(("batch", None), (b, self.sc.stop_len)),
            lengths=rows,
            done=rows,
            step=repl,
            pad=rows,
            key=repl,
        )

    def _jitted(self, b: int, t: int, n: int, cache_sh: KVCache, state_sh: DecodeState):
        cfg, sc, in_context = self.cfg, self.sc, self.layout.traced
        rows, repl = state_sh.pad, state_sh.key
        init = jax.jit(in_context(lambda: init_cache(cfg, b, t + n - 1)), out_shardings=cache_sh)
        begin = jax.jit(
            in_context(functools.partial(start, cfg=cfg, sc=sc)),
            in_shardings=(
                self.param_shardings,
                cache_sh,
                self._sh(("batch", None), (b, t)),
                rows,
                repl,
            ),
            out_shardings=state_sh,
            donate_argnums=(1,),
        )
        step = jax.jit(
            in_context(functools.partial(advance, cfg=cfg, sc=sc)),
            in_shardings=(self.param_shardings, state_sh, repl),
            out_shardings=state_sh,
            donate_argnums=(1,),
        )
        return init, begin, step

    def generate(self, params, prompts, stream=None, chunk: int | None = None) -> Generation:
        """Complete each prompt (a sequence of ids). `stream(new_ids_per_prompt)` is called
        after the first id and after every `chunk` further ids (default: one chunk)."""
        self.check(prompts)
        b, t, n = self.shapes([len(p) for p in prompts])
        tokens, pad = _left_pad(prompts, b, t)
        fresh = (b, t, n) not in self._compiled
        init, begin, step, compile_s = self.compiled(b, t, n)
        params = self.prepare(params)
        clock = _Clock(compile=compile_s if fresh else 0.0)
        with clock("prefill"):
            cache = jax.block_until_ready(init())
            state = jax.block_until_ready(begin(params, cache, tokens, pad, self._key))
        emitted = _Emitter(stream, len(prompts))
        emitted.update(state)
        with clock("decode"):
            while True:
                host = jax.device_get((state.step, state.done))
                if host[0] >= n or host[1].all():
                    break
                limit = np.int32(min(int(host[0]) + (chunk or n), n))
                state = step(params, state, limit)
                emitted.update(state)
        return self._result(jax.device_get(state), len(prompts), clock)

    @functools.cached_property
    def _key(self):
        return jax.random.key(self.sc.seed)

    def _result(self, state: DecodeState, rows: int, clock) -> Generation:
        ids, finish = [], []
        for i in range(rows):
            row = [int(x) for x in state.tokens[i, : state.lengths[i]]]
            ids.append(row)
            ended = bool(state.done[i])
            eos = ended and self.sc.eos_id is not None and row[-1] == self.sc.eos_id
            finish.append("eos" if eos else "stop" if ended else "length")
        return Generation(
            ids, finish, int(state.step), clock["prefill"], clock["decode"], clock["compile"]
        )


def unstacked_shardings(specs, layout: Layout):
    """Shardings of `unstack_layers`' output: each layer's weights lose the `layers` axis."""

    def one_layer(s: param_lib.ParamSpec):
        return layout.sharding(s.axes[1:], s.shape[1:])

    if "moe" in specs["layers"]:  # dense and MoE layers differ: shard each one's own
        per_layer = moe.unstack_layers(specs, take=lambda s, i: one_layer(s))
        return {**layout.param_shardings({**specs, "layers": {}}), "layers": per_layer["layers"]}

    n = jax.tree.leaves(specs["layers"], is_leaf=param_lib.is_spec)[0].shape[0]
    layer = jax.tree.map(one_layer, specs["layers"], is_leaf=param_lib.is_spec)
    return {**layout.param_shardings(specs), "layers": (layer,) * n}


def _left_pad(prompts, b: int, t: int):
    """(b, t) ids, each prompt at the right end; rows past the prompts repeat prompt 0."""
    tokens = np.zeros((b, t), np.int32)
    pad = np.zeros((b,), np.int32)
    for i in range(b):
        p = prompts[i] if i < len(prompts) else prompts[0]
        tokens[i, t - len(p) :], pad[i] = p, t - len(p)
    return tokens, pad


class _Clock(dict):
    """Seconds per label, summed over `with clock(label):` blocks."""

    def __call__(self, label: str):
        @contextlib.contextmanager
        def block():
            t0 = time.perf_counter()
            yield
            self[label] = self.get(label, 0.0) + time.perf_counter() - t0

        return block()


class _Emitter:
    """Hands the ids made since the last call to `stream`, row by row."""

    def __init__(self, stream, rows: int):
        self.stream, self.sent = stream, [0] * rows

    def update(self, state: DecodeState) -> None:
        if self.stream is None:
            return
        tokens, lengths = jax.device_get((state.tokens, state.lengths))
        new = []
        for i, sent in enumerate(self.sent):
            new.append([int(x) for x in tokens[i, sent : lengths[i]]])
            self.sent[i] = int(lengths[i])
        self.stream(new)
