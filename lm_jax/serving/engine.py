"""Continuous batching: a slot-based decode engine where requests join and leave a running batch.

The device holds `slots` rows of KV cache [L, slots, max_len, K, H] (a model whose every layer
is sliding-window, Mistral: a ring buffer of window + prefill_chunk - 1 slots per row,
`lm_jax.nn.attention.RingCache`) and, per slot, the last token, its position, the number of
tokens generated, a PRNG key and the sampling settings. Two jitted programs move it (the cache
buffer is donated, so both update it in place):

  prefill(slot, prompt [1, T])  runs one prompt (padded to a bucket of 16) at positions 0..T-1
                                into that slot's cache row and samples its first token;
  decode(active [slots])        `decode_steps` tokens for every slot in one dispatch (a scan),
                                each at its own position.

The host (`Engine.step`) admits waiting requests into free slots (one prefill each), runs one
decode dispatch, reads the tokens back and ends requests on a stop token, `max_tokens` or a
cancel; a freed slot takes the next request at the following step. Stale cache entries are never
read: attention is causal by position, and a slot writes position p before any query at p.

Per-request LoRA adapters (`Engine(..., adapters={name: (adapters, LoraConfig)})`,
`Request.adapter`): the adapter sets are stacked into one bank (`lm_jax.adapters.rows`) and each
slot carries its adapter's index, so requests on different adapters (and on the base model) run
in the same decode dispatch; a request's output equals that of the model with its adapter merged.

Sampling is `lm_jax.sampling.sample_rows` with the request's settings and keys
`fold_in(key(seed), i)` for its i-th token, so a request's output depends on itself only (its
prompt, settings and seed), not on what else runs beside it: greedy output equals
`lm_jax.generate` greedy output of the prompt alone, as the tests check.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax import prefill as prefill_lib
from lm_jax.adapters.rows import select_rows, stack_adapters
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.generate import PROMPT_BUCKET, cache_for, prepare_prompts
from lm_jax.nn.attention import LayerCache, RingCache
from lm_jax.nn.lora import ROWS
from lm_jax.nn.transformer import Transformer
from lm_jax.sampling import _check_sampling, sample_rows
from lm_jax.utils import round_up


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Flags `--engine.<field>` (experiments/serve.py)."""

    slots: int = 8  # requests decoded together (rows of KV cache)
    max_len: int = 1024  # prompt + generated tokens per request (cache length); <= model max_len
    decode_steps: int = 4  # tokens per decode dispatch (fewer host round trips; a finished
    # request wastes at most decode_steps - 1 of them)
    top_logprobs: int = 5  # alternatives per token a request may ask for (computed per step)
    prefill_chunk: int = prefill_lib.DEFAULT_CHUNK  # prompt tokens per prefill window (0 = all)

    def check(self, model_max_len: int) -> EngineConfig:
        for name in ("slots", "max_len", "decode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--engine.{name} must be >= 1, got {getattr(self, name)}.")
        if self.prefill_chunk < 0:
            raise ConfigError(
                f"--engine.prefill_chunk must be >= 0 (0 = the whole prompt at once), got "
                f"{self.prefill_chunk}."
            )
        if self.top_logprobs < 0:
            raise ConfigError(f"--engine.top_logprobs must be >= 0, got {self.top_logprobs}.")
        if self.max_len > model_max_len:
            raise ConfigError(
                f"--engine.max_len={self.max_len} exceeds the model's max_len {model_max_len}: "
                f"pass --engine.max_len <= {model_max_len}."
            )
        return self


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request (token ids in, token ids out)."""

    prompt: Sequence[int]
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: drawn from the engine's counter
    stop_tokens: Sequence[int] = ()
    logprobs: int = 0  # top alternatives to return per token (<= EngineConfig.top_logprobs)
    adapter: str = ""  # LoRA adapter to run with (a name given to Engine); '' = the base model


class Event(NamedTuple):
    """One generated token of request `rid`; `finish` is None, "stop" (it is a stop token),
    "length" (max_tokens reached) or "cancelled" (token -1: no token)."""

    rid: int
    token: int
    logprob: float  # log p(token) under the model (temperature 1, no truncation)
    top: tuple[tuple[int, float], ...]  # the request's `logprobs` most likely (id, log p)
    finish: str | None


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    top: list[tuple[tuple[int, float], ...]]
    finish: str  # "stop" | "length" | "cancelled"


class _Slots(NamedTuple):
    """Device state of all slots; S = EngineConfig.slots."""

    cache: LayerCache | RingCache  # k, v [L, S, max_len, K, H] (a ring: [L, S, R, K, H])
    tok: jax.Array  # [S] int32: the last token (input of the next decode step)
    pos: jax.Array  # [S] int32: its position
    count: jax.Array  # [S] int32: tokens generated so far (the PRNG fold-in index)
    keys: jax.Array  # [S] PRNG keys
    temperature: jax.Array  # [S] f32
    top_k: jax.Array  # [S] int32
    top_p: jax.Array  # [S] f32
    adapter: jax.Array  # [S] int32: index into the adapter bank (0 = the base model)


class _Step(NamedTuple):
    tokens: jax.Array  # [S, n] int32
    logprobs: jax.Array  # [S, n]
    top_ids: jax.Array  # [S, n, top]
    top_logprobs: jax.Array  # [S, n, top]


def _sample(logits, s: _Slots, top: int, want_top):
    """Sample the next token of every slot from logits [S, V] with its key and settings; the
    `top` most likely (ids, log-probs) [S, top] only when `want_top` (a traced bool), else 0."""
    keys = jax.vmap(jax.random.fold_in)(s.keys, s.count)
    out = sample_rows(logits, keys, s.temperature, s.top_k, s.top_p)
    B = logits.shape[0]

    def best():
        lp, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), top)
        return ids.astype(jnp.int32), lp

    none = lambda: (jnp.zeros((B, top), jnp.int32), jnp.zeros((B, top), jnp.float32))
    ids, lp = jax.lax.cond(want_top, best, none) if top else none()
    return out, ids, lp


@functools.lru_cache(maxsize=8)
def _programs(config: ModelConfig, ecfg: EngineConfig):
    """(init, prefill, decode) jitted for one model config and engine config."""
    model = Transformer(config)
    S, C, top = ecfg.slots, ecfg.max_len, ecfg.top_logprobs

    def init():
        # every layer sliding-window (Mistral): a ring of window + prefill window - 1 slots
        cache = cache_for(config, S, C, ecfg.prefill_chunk or C, ring=True)
        zeros = jnp.zeros((S,), jnp.int32)
        keys = jax.random.split(jax.random.key(0), S)
        ones = jnp.ones((S,), jnp.float32)
        return _Slots(cache, zeros, zeros, zeros, keys, ones, zeros, ones, zeros)

    def rows(bank, index):  # the per-row adapter factors (no collection without a bank)
        return None if bank is None else {ROWS: select_rows(bank, index)}

    def prefill(
        params, bank, s: _Slots, slot, tokens, length, key, temperature, top_k, top_p, adapter,
        want,
    ):  # fmt: skip
        row = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), s.cache)
        if isinstance(row, RingCache):  # the slot's previous request leaves no position behind
            row = row._replace(pos=jnp.full_like(row.pos, -1))
        last_pos = jnp.reshape(length - 1, (1,)).astype(jnp.int32)
        chunk, extra = ecfg.prefill_chunk, rows(bank, adapter[None])
        last, row = prefill_lib.prefill(
            model, params, tokens, row, last_pos, chunk=chunk, variables=extra
        )
        one = _Slots(
            row, s.tok[:1], s.pos[:1], jnp.zeros((1,), jnp.int32), key[None],
            temperature[None], top_k[None], top_p[None], adapter[None],
        )  # fmt: skip
        out, ids, lp = _sample(last, one, top, want)
        cache = jax.tree.map(
            lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=1), s.cache, row
        )
        s = _Slots(
            cache,
            s.tok.at[slot].set(out.tokens[0]),
            s.pos.at[slot].set(length),
            s.count.at[slot].set(1),
            s.keys.at[slot].set(key),
            s.temperature.at[slot].set(temperature),
            s.top_k.at[slot].set(top_k),
            s.top_p.at[slot].set(top_p),
            s.adapter.at[slot].set(adapter),
        )
        return s, _Step(out.tokens[:, None], out.logprobs[:, None], ids[:, None], lp[:, None])

    def decode(params, bank, s: _Slots, active, want):
        variables = {"params": params, **(rows(bank, s.adapter) or {})}

        def one(s: _Slots, _):
            pos = jnp.minimum(s.pos, C - 1)[:, None]  # finished rows may run past the cache
            logits, cache = model.apply(variables, s.tok[:, None], pos, cache=s.cache)
            out, ids, lp = _sample(logits[:, 0], s, top, want)
            step = active.astype(jnp.int32)
            s = s._replace(cache=cache, tok=out.tokens, pos=s.pos + step, count=s.count + step)
            return s, _Step(out.tokens, out.logprobs, ids, lp)

        s, steps = jax.lax.scan(one, s, None, length=ecfg.decode_steps)
        return s, jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), steps)  # [S, n, ...]

    return (
        jax.jit(init),
        jax.jit(prefill, donate_argnums=(2,)),
        jax.jit(decode, donate_argnums=(2,)),
    )


@dataclasses.dataclass
class _Running:
    rid: int
    req: Request
    stop: frozenset
    generated: int = 0


class Engine:
    """Host side of continuous batching over one model (see the module docstring).

    engine.add(Request(...)) -> rid; engine.step() -> [Event] (call while engine.busy);
    engine.cancel(rid); engine.run([Request]) -> [Completion] in order. Not thread-safe: one
    thread drives it (`lm_jax.serving.runner.Runner` for the server). `adapters`: {name:
    (adapter tree, LoraConfig)} over `params` (the base), selected by `Request.adapter`."""

    def __init__(
        self,
        config: ModelConfig,
        params,
        engine: EngineConfig = EngineConfig(),
        adapters: dict[str, tuple[dict, object]] | None = None,
    ):
        # on device once (host numpy params would be copied over at every dispatch)
        self.config, self.params = config, jax.device_put(params)
        self.ecfg = engine.check(config.max_len)
        self.adapter_names = sorted(adapters or {})
        if "" in self.adapter_names:
            raise ConfigError("an adapter name must not be empty ('' is the base model).")
        self.bank = None
        if adapters:
            bank = stack_adapters(params, [adapters[n] for n in self.adapter_names])
            self.bank = jax.device_put(bank)
        self._adapter_index = {n: i for i, n in enumerate(["", *self.adapter_names])}
        self._init, self._prefill, self._decode = _programs(config, self.ecfg)
        self._state = None  # allocated on first use
        self._waiting: collections.deque[tuple[int, Request]] = collections.deque()
        self._slots: list[_Running | None] = [None] * self.ecfg.slots
        self._cancelled: list[int] = []
        self._ids = itertools.count()
        self._seeds = itertools.count(1 << 20)
        self.decode_dispatches = 0

    # ------------------------------------------------------------------ requests

    def check(self, req: Request) -> None:
        """ValueError naming the problem and the fix for a request the engine cannot run."""
        V, C = self.config.vocab_size, self.ecfg.max_len
        prepare_prompts([list(req.prompt)], vocab_size=V)
        _check_sampling(req.temperature, req.top_k, req.top_p)
        if int(req.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}.")
        n = len(req.prompt)
        if n + int(req.max_tokens) > C:
            if n >= C:
                raise ValueError(
                    f"the prompt has {n} tokens but the engine's max_len is {C}: shorten the "
                    "prompt (or serve with a larger --engine.max_len)."
                )
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the engine's "
                f"max_len {C}: lower max_tokens to at most {C - n}."
            )
        if not 0 <= int(req.logprobs) <= self.ecfg.top_logprobs:
            raise ValueError(
                f"logprobs must be in [0, {self.ecfg.top_logprobs}] (--engine.top_logprobs), "
                f"got {req.logprobs}."
            )
        if any(not 0 <= int(t) < V for t in req.stop_tokens):
            raise ValueError(f"stop tokens must be ids in [0, {V}), got {list(req.stop_tokens)}.")
        if req.adapter not in self._adapter_index:
            have = ", ".join(map(repr, self.adapter_names)) or "none"
            raise ValueError(
                f"unknown adapter {req.adapter!r}: this engine serves {have} ('' = the base)."
            )

    def add(self, req: Request) -> int:
        self.check(req)
        rid = next(self._ids)
        self._waiting.append((rid, req))
        return rid

    def cancel(self, rid: int) -> bool:
        """Drop a waiting or running request (its next `step` reports "cancelled")."""
        for i, (r, _) in enumerate(self._waiting):
            if r == rid:
                del self._waiting[i]
                self._cancelled.append(rid)
                return True
        for i, run in enumerate(self._slots):
            if run is not None and run.rid == rid:
                self._slots[i] = None
                self._cancelled.append(rid)
                return True
        return False

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self.num_running or self._cancelled)

    # ------------------------------------------------------------------ stepping

    def _emit(self, slot: int, tok: int, lp: float, ids, lps) -> Event:
        run = self._slots[slot]
        run.generated += 1
        top = tuple((int(i), float(v)) for i, v in zip(ids[: run.req.logprobs], lps))
        finish = None
        if tok in run.stop:
            finish = "stop"
        elif run.generated >= run.req.max_tokens:
            finish = "length"
        if finish is not None:
            self._slots[slot] = None
        return Event(run.rid, tok, lp, top, finish)

    def _admit(self, slot: int, rid: int, req: Request):
        n = len(req.prompt)
        T = min(round_up(n, PROMPT_BUCKET), self.ecfg.max_len)
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = req.prompt
        seed = next(self._seeds) if req.seed is None else int(req.seed)
        greedy = float(req.temperature) == 0.0
        self._state, first = self._prefill(
            self.params, self.bank, self._state, jnp.int32(slot), jnp.asarray(tokens),
            jnp.int32(n), jax.random.key(seed), jnp.float32(req.temperature),
            jnp.int32(0 if greedy else req.top_k), jnp.float32(1.0 if greedy else req.top_p),
            jnp.int32(self._adapter_index[req.adapter]), jnp.bool_(req.logprobs > 0),
        )  # fmt: skip
        self._slots[slot] = _Running(rid, req, frozenset(int(t) for t in req.stop_tokens))
        return first

    def step(self) -> list[Event]:
        """Admit waiting requests into free slots, decode `decode_steps` tokens for all running
        ones; returns the new tokens (and endings) in order."""
        events = [Event(rid, -1, 0.0, (), "cancelled") for rid in self._cancelled]
        self._cancelled = []
        if self._state is None and (self._waiting or self.num_running):
            self._state = self._init()
        admitted = []
        for slot in range(self.ecfg.slots):
            if self._slots[slot] is None and self._waiting:
                rid, req = self._waiting.popleft()
                admitted.append((slot, self._admit(slot, rid, req)))
        for slot, first in admitted:
            first = jax.device_get(first)
            events.append(
                self._emit(slot, int(first.tokens[0, 0]), float(first.logprobs[0, 0]),
                           first.top_ids[0, 0], first.top_logprobs[0, 0])
            )  # fmt: skip
        active = np.array([r is not None for r in self._slots])
        if not active.any():
            return events
        want = any(r is not None and r.req.logprobs > 0 for r in self._slots)
        self._state, steps = self._decode(
            self.params, self.bank, self._state, jnp.asarray(active), jnp.bool_(want)
        )
        self.decode_dispatches += 1
        steps = jax.device_get(steps)
        for slot in np.flatnonzero(active):
            for j in range(self.ecfg.decode_steps):
                if self._slots[slot] is None:
                    break
                events.append(
                    self._emit(slot, int(steps.tokens[slot, j]), float(steps.logprobs[slot, j]),
                               steps.top_ids[slot, j], steps.top_logprobs[slot, j])
                )  # fmt: skip
        return events

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Every request to its end, all through the running batch; results in order."""
        rids = [self.add(r) for r in requests]
        out = {rid: Completion([], [], [], "") for rid in rids}
        while self.busy:
            for ev in self.step():
                c = out.get(ev.rid)
                if c is None:
                    continue
                if ev.token >= 0:
                    c.tokens.append(ev.token)
                    c.logprobs.append(ev.logprob)
                    c.top.append(ev.top)
                if ev.finish is not None:
                    c.finish = ev.finish
        return [out[rid] for rid in rids]
