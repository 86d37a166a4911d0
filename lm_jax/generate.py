"""Autoregressive sampling with a KV cache (scoring given sequences: `sequence_scoring.py`).

`generate` runs ONE jitted program per static setting (config, shapes, top_k, greedy, ...):
prefill the preallocated KV cache with the right-padded prompts at positions 0..T-1, sample the
first token from each row's last prompt position, then a `jax.lax.while_loop` decodes one token
per step for every row at its own position `prompt_length_b + i` and stops early once every row
has emitted a stop token. Pad slots of short prompts are written to the cache by the prefill but
are never seen: the cache mask is causal by position and decode overwrites slot `p` before a
query at position >= p exists. With `prefix_embeds` [B, P, D] (e.g. a captioner's projected
image tokens) the prefill runs [prefix; prompt] at positions 0..P+T-1 and decoding continues
from position P + prompt_length_b: the one decode loop for LMs and prefix LMs alike.

Sampling is pure (`sampling_logprobs`, `sample_logits`): temperature, then top-k, then top-p
(nucleus: the smallest set of tokens whose probability reaches p, the top token always kept);
temperature 0 is greedy. Per step, the key is `fold_in(key, step)`, so output is a function of
(params, prompts, key, settings) only.

Two log-probabilities are returned per token: `logprobs` under the unmodified model (temperature
1, no truncation: log pi(x) for alignment / DPG) and `sample_logprobs` under the distribution
actually sampled from (log q(x) for importance sampling / QRS; 0 for greedy).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.transformer import Transformer, init_cache, ring_cache_len
from lm_jax.nn.two_towers import Captioner, CaptionerConfig, TextInputError
from lm_jax.nn.vision import check_images
from lm_jax.prefill import DEFAULT_CHUNK, check_chunk, prefill, tokens_per_call
from lm_jax.prompts import check_ids, prepare_prompts
from lm_jax.sampling import SampleOutput, _check_sampling, _sample, sample_logits, sampling_logprobs
from lm_jax.sharding import constrain
from lm_jax.utils import round_up as _round_up

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this (fewer recompiles)
PROMPT_BUCKET = 16  # padded prompt lengths likewise
CACHE_NAMES = ("layers", "batch", "length", "kv_heads", None)  # k, v [L, B, S, K, H]


def constrain_cache(cache):
    """Every leaf of a KV cache on its logical axes (k, v [L, B, S, K, H]; a ring's pos [L, B,
    S])."""
    return jax.tree.map(lambda c: constrain(c, CACHE_NAMES[: c.ndim]), cache)


def cache_for(config: ModelConfig, batch: int, cache_len: int, tokens_per_call: int, ring: bool):
    """The KV cache of a decode loop: a ring buffer (`RingCache`) when every layer is
    sliding-window and the ring is shorter than `cache_len`, else the full-length one."""
    n = ring_cache_len(config, tokens_per_call) if ring else None
    if n is not None and n < cache_len:
        return constrain_cache(init_cache(config, batch, n, ring=True))
    return constrain_cache(init_cache(config, batch, cache_len))


class GenerateOutput(NamedTuple):
    """Result of `generate`; N = max_new_tokens."""

    tokens: jax.Array  # [B, N] int32; pad_id after a stop token
    logprobs: jax.Array  # [B, N] float32 log pi(token), temperature 1; 0 after a stop
    sample_logprobs: jax.Array  # [B, N] float32 log q(token) as sampled; 0 after a stop
    lengths: jax.Array  # [B] int32 generated tokens, including the stop token
    done: jax.Array  # [B] bool: the row ended on a stop token

    @property
    def mask(self) -> jax.Array:
        """[B, N] bool: True at generated tokens (t < lengths)."""
        n = self.tokens.shape[1]
        return jnp.arange(n)[None, :] < self.lengths[:, None]


def _limit(config: ModelConfig, max_len: int | None) -> int:
    if max_len is None:
        return config.max_len
    if config.position == "learned" and max_len > config.max_len:
        raise ValueError(
            f"max_len={max_len} exceeds the model's {config.max_len} learned positions; "
            f"pass max_len <= {config.max_len}."
        )
    return int(max_len)


class Plan(NamedTuple):
    """Checked, bucketed inputs of one generation call (`plan_generation`)."""

    tokens: np.ndarray  # [B, T] int32 prompts, right-padded to a PROMPT_BUCKET multiple
    lengths: np.ndarray  # [B] int32 prompt lengths
    stop: np.ndarray  # [8k] int32 stop ids, padded with -1 (never matches)
    max_new: int
    cache_len: int  # KV-cache slots: prefix + longest prompt + max_new (+ headroom), bucketed
    top_k: int  # static top-k: 0 for all tokens (and when greedy)
    greedy: bool  # temperature 0
    use_top_p: bool  # the nucleus filter is on (top_p < 1, not greedy)

    def empty_output(self) -> GenerateOutput:
        """The result of a request for 0 new tokens."""
        B = self.tokens.shape[0]
        z = jnp.zeros((B, 0), jnp.float32)
        zi = jnp.zeros((B,), jnp.int32)
        return GenerateOutput(jnp.zeros((B, 0), jnp.int32), z, z, zi, jnp.zeros((B,), bool))

    def inputs(self, key, temperature: float, top_p: float, pad_id: int) -> tuple:
        """The jitted decode programs' traced arguments after the params: (tokens, lengths,
        key, temperature, top_p, stop, pad_id)."""
        return (
            jnp.asarray(self.tokens),
            jnp.asarray(self.lengths),
            key,
            jnp.float32(1.0 if self.greedy else temperature),
            jnp.float32(top_p),
            jnp.asarray(self.stop),
            jnp.int32(pad_id),
        )


def plan_generation(
    config: ModelConfig,
    prompt_tokens,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    prompt_lengths=None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    max_len: int | None = None,
    prefix_shape: tuple[int, ...] | None = None,
    headroom: int = 0,
) -> Plan:
    """Check a generation request and fix its static shapes; every error names the fix.

    `prefix_shape` is that of `prefix_embeds` [B, P, d_model] when given; `headroom` adds cache
    slots past prefix + prompt + max_new_tokens (a speculative round writes up to that many
    draft tokens beyond the last one kept), still capped at the maximum length."""
    V = config.vocab_size
    _check_sampling(temperature, top_k, top_p)
    if int(max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    check_ids(np.asarray([pad_id]), V, "pad_id")
    stop = np.asarray(list(stop_tokens), np.int32).reshape(-1)
    check_ids(stop, V, "stop_tokens")
    # -1 never matches: a few stop-list sizes share one compiled program.
    stop = np.pad(stop, (0, _round_up(max(len(stop), 1), 8) - len(stop)), constant_values=-1)
    tokens, lengths = prepare_prompts(prompt_tokens, prompt_lengths, V, pad_id)
    B = tokens.shape[0]
    N = int(max_new_tokens)
    P = 0
    if prefix_shape is not None:
        shape = tuple(prefix_shape)
        if len(shape) != 3 or shape[0] != B or shape[2] != config.d_model:
            raise ValueError(
                f"prefix_embeds must be [B={B}, P, d_model={config.d_model}] (one row per "
                f"prompt), got shape {shape}."
            )
        P = shape[1]
    limit = _limit(config, max_len)
    longest = int(lengths.max())
    what = f"{P} prefix embeddings + prompt" if P else "prompt"
    if P + longest > limit:
        raise ValueError(
            f"{what} longer than the maximum length: the longest prompt has {longest} tokens "
            f"but the maximum length is {limit} (config.max_len={config.max_len}); shorten "
            "the prompt."
        )
    if P + longest + N > limit:
        raise ValueError(
            f"{what} ({P + longest} tokens) + max_new_tokens ({N}) = {P + longest + N} exceeds "
            f"the maximum length {limit} (config.max_len={config.max_len}); lower "
            f"max_new_tokens to at most {limit - P - longest} or shorten the prompt."
        )
    cache_len = min(_round_up(P + longest + N + headroom, CACHE_BUCKET), limit)
    T = min(_round_up(tokens.shape[1], PROMPT_BUCKET), cache_len - P)  # >= longest
    if T > tokens.shape[1]:
        tokens = np.pad(tokens, ((0, 0), (0, T - tokens.shape[1])), constant_values=pad_id)
    tokens = tokens[:, :T]  # an array padded past the cache: only pad slots go
    greedy = float(temperature) == 0.0
    top_k = 0 if greedy or int(top_k) >= V else int(top_k)
    use_top_p = float(top_p) < 1.0 and not greedy
    return Plan(tokens, lengths, stop, N, cache_len, top_k, greedy, use_top_p)


# --------------------------------------------------------------------------- generate


class _State(NamedTuple):
    i: jax.Array  # next step index
    tok: jax.Array  # [B] last sampled token
    cache: object
    done: jax.Array  # [B] bool
    lengths: jax.Array  # [B] int32
    tokens: jax.Array  # [B, N]
    logprobs: jax.Array  # [B, N]
    sample_logprobs: jax.Array  # [B, N]


@functools.lru_cache(maxsize=32)
def _generate_fn(
    config: ModelConfig,
    cache_len: int,
    max_new: int,
    top_k: int,
    greedy: bool,
    use_top_p: bool,
    prefill_chunk: int,
    ring_cache: bool = True,
):
    """The jitted prefill + while_loop decode for one static setting (shapes retrace in jit)."""
    model = Transformer(config)

    def run(params, tokens, lengths, key, temperature, top_p, stop, pad_id, prefix):
        B = tokens.shape[0]
        P = 0 if prefix is None else prefix.shape[1]  # prefix embeddings before the prompt
        tokens = constrain(tokens, ("batch", "length"))
        per_call = tokens_per_call(tokens.shape[1], prefill_chunk, None if prefix is None else P)
        cache = cache_for(config, B, cache_len, per_call, ring_cache)
        lengths = lengths + P  # from here on: lengths of [prefix; prompt]
        last, cache = prefill(model, params, tokens, cache, lengths - 1, prefix, prefill_chunk)

        def sample(lg, i):
            k = jax.random.fold_in(key, i)
            return _sample(lg, k, temperature, top_k, top_p, greedy, use_top_p)

        def record(s: _State, out: SampleOutput, cache) -> _State:
            active = ~s.done
            tok = jnp.where(active, out.tokens, pad_id)
            lp = jnp.where(active, out.logprobs, 0.0)
            slp = jnp.where(active, out.sample_logprobs, 0.0)
            hit = jnp.any(out.tokens[:, None] == stop[None, :], axis=-1)
            return _State(
                i=s.i + 1,
                tok=out.tokens,
                cache=cache,
                done=s.done | (active & hit),
                lengths=s.lengths + active.astype(jnp.int32),
                tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.i)),
                logprobs=jax.lax.dynamic_update_slice(s.logprobs, lp[:, None], (0, s.i)),
                sample_logprobs=jax.lax.dynamic_update_slice(
                    s.sample_logprobs, slp[:, None], (0, s.i)
                ),
            )

        s0 = _State(
            i=jnp.int32(0),
            tok=jnp.zeros((B,), jnp.int32),
            cache=cache,
            done=jnp.zeros((B,), bool),
            lengths=jnp.zeros((B,), jnp.int32),
            tokens=jnp.full((B, max_new), pad_id, jnp.int32),
            logprobs=jnp.zeros((B, max_new), jnp.float32),
            sample_logprobs=jnp.zeros((B, max_new), jnp.float32),
        )
        s = record(s0, sample(last, 0), cache)

        def cond(s: _State):
            return (s.i < max_new) & ~jnp.all(s.done)

        def body(s: _State) -> _State:
            pos = (lengths + s.i - 1)[:, None]  # [B, 1]: the position of s.tok
            lg, cache = model.apply({"params": params}, s.tok[:, None], pos, cache=s.cache)
            return record(s, sample(lg[:, 0], s.i), cache)

        s = jax.lax.while_loop(cond, body, s)
        return GenerateOutput(s.tokens, s.logprobs, s.sample_logprobs, s.lengths, s.done)

    return jax.jit(run)


def generate(
    config: ModelConfig,
    params,
    prompt_tokens,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prompt_lengths=None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    max_len: int | None = None,
    prefix_embeds=None,
    prefill_chunk: int = DEFAULT_CHUNK,
    ring_cache: bool = True,
) -> GenerateOutput:
    """Sample up to max_new_tokens continuations of each prompt (see the module docstring).

    prompt_tokens: list of token-id lists (ragged) or int array [B, T] right-padded with
    `prompt_lengths` [B]. `prefix_embeds` [B, P, d_model] (optional) go before every prompt
    (`Transformer(prefix_embeds=)`, e.g. image tokens). `max_len` bounds prefix + prompt + new
    tokens (default config.max_len; RoPE models may pass more). Under `jax.set_mesh(mesh)`
    with sharded params it runs sharded. The prompt is prefilled in windows of `prefill_chunk`
    tokens (`lm_jax.prefill`; 0 = all at once). A model whose every layer is sliding-window
    (Mistral) keeps a ring-buffer cache of window + prefill window - 1 slots instead of the full
    length when that is shorter (`ring_cache=False`: always the full one).
    """
    prefill_chunk = check_chunk(prefill_chunk)
    if prefix_embeds is not None:
        prefix_embeds = jnp.asarray(prefix_embeds)
    plan = plan_generation(
        config,
        prompt_tokens,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        prompt_lengths,
        stop_tokens,
        pad_id,
        max_len,
        prefix_shape=None if prefix_embeds is None else prefix_embeds.shape,
    )
    if plan.max_new == 0:
        return plan.empty_output()
    fn = _generate_fn(
        config, plan.cache_len, plan.max_new, plan.top_k, plan.greedy, plan.use_top_p,
        prefill_chunk, ring_cache,
    )  # fmt: skip
    return fn(
        params,
        *plan.inputs(key, temperature, top_p, pad_id),
        prefix_embeds,
    )


__all__ = [
    "GenerateOutput",
    "SampleOutput",
    "generate",
    "prepare_prompts",
    "sample_logits",
    "sampling_logprobs",
]


# --------------------------------------------------------------------------- image prefix


@functools.lru_cache(maxsize=8)
def _prefix_fn(cfg: CaptionerConfig):
    return jax.jit(lambda p, x: Captioner(cfg).apply({"params": p}, x, method=Captioner.prefix))


def generate_with_prefix(
    cfg: CaptionerConfig,
    params,
    images,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    pad_id: int = 0,
    top_p: float = 1.0,
):
    """Caption images [B, H, W, C] with a `Captioner`: `generate` of the decoder (`params['lm']`)
    from the prompt [BOS] after the image prefix embeddings, until `eos_id`; temperature 0 =
    greedy (the default), else sampling with top_k / top_p. Returns its `GenerateOutput`
    (tokens [B, N], pad_id after the stop token; lengths [B] including it; log-probs)."""
    check_images(images, cfg.vision)
    limit = cfg.decoder.max_len
    need = cfg.num_prefix + 1 + int(max_new_tokens)
    if need > limit:
        raise TextInputError(
            f"{cfg.num_prefix} prefix tokens + BOS + max_new_tokens={max_new_tokens} = {need} "
            f"exceed the decoder's max_len {limit}: lower max_new_tokens to "
            f"{limit - cfg.num_prefix - 1}."
        )
    prefix = _prefix_fn(cfg)(params, jnp.asarray(images))
    prompts = np.full((prefix.shape[0], 1), bos_id, np.int32)
    key = jax.random.key(0) if key is None else key
    return generate(
        cfg.decoder, params["lm"], prompts, key, max_new_tokens, temperature, top_k, top_p,
        stop_tokens=(eos_id,), pad_id=pad_id, prefix_embeds=prefix,
    )  # fmt: skip
