"""Pure token sampling from logits: temperature, then top-k, then top-p (nucleus); 0 = greedy.

Used by the LM generator (`lm_jax.generate`) and the prefix captioner (`lm_jax.nn.two_towers`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] log-softmax of the raw logits at the token
    sample_logprobs: jax.Array  # [B] log-prob under the sampling distribution


# --------------------------------------------------------------------------- sampling (pure)


def sampling_logprobs(
    logits: jax.Array, temperature=1.0, top_k: int = 0, top_p=1.0, use_top_p: bool | None = None
) -> jax.Array:
    """Log-probs [..., V] of the sampling distribution (-inf outside the kept set).

    logits / temperature; keep the top_k largest (0 = all; ties at the k-th value are kept);
    then keep the smallest prefix of tokens sorted by probability whose mass reaches top_p
    (the top token always). `temperature` and `top_p` may be traced; `top_k` is static.
    """
    x = logits.astype(jnp.float32) / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if use_top_p is None:
        use_top_p = isinstance(top_p, jax.Array) or float(top_p) < 1.0
    if use_top_p:
        s = -jnp.sort(-x, axis=-1)  # descending
        p = jax.nn.softmax(s, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p  # mass strictly before each sorted token
        n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
        thresh = jnp.take_along_axis(s, n_keep - 1, axis=-1)
        x = jnp.where(x >= thresh, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def _sample(logits, key, temperature, top_k, top_p, greedy: bool, use_top_p: bool):
    logits = logits.astype(jnp.float32)  # [B, V]
    base = jax.nn.log_softmax(logits, axis=-1)
    if greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        slp = jnp.zeros(tok.shape, jnp.float32)
    else:
        q = sampling_logprobs(logits, temperature, top_k, top_p, use_top_p)
        tok = jax.random.categorical(key, q, axis=-1).astype(jnp.int32)
        slp = jnp.take_along_axis(q, tok[:, None], axis=-1)[:, 0]
    lp = jnp.take_along_axis(base, tok[:, None], axis=-1)[:, 0]
    return SampleOutput(tok, lp, slp)


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature=1.0, top_k: int = 0, top_p=1.0
) -> SampleOutput:
    """Sample one token per row of logits [B, V]; temperature 0 = greedy (argmax).

    Returns tokens [B], logprobs [B] (log_softmax of the raw logits at the token) and
    sample_logprobs [B] (log-prob under the sampling distribution; 0 when greedy).
    """
    _check_sampling(temperature, top_k, top_p)
    greedy = not isinstance(temperature, jax.Array) and float(temperature) == 0.0
    use_top_p = isinstance(top_p, jax.Array) or float(top_p) < 1.0
    return _sample(logits, key, temperature, top_k, top_p, greedy, use_top_p)


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, jax.Array) and float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {top_k}.")
    if not isinstance(top_p, jax.Array) and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}.")


# --------------------------------------------------------------------------- per-row settings


def rows_sampling_logprobs(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """`sampling_logprobs` with settings per row: logits [B, V]; temperature [B] (> 0), top_k
    [B] int (0 = all), top_p [B] -> log-probs [B, V] of each row's sampling distribution.

    For equal settings in every row this is `sampling_logprobs` (same kept set, same ties)."""
    x = logits.astype(jnp.float32) / temperature[:, None]
    V = x.shape[-1]
    s = -jnp.sort(-x, axis=-1)  # [B, V] descending
    k = jnp.where((top_k <= 0) | (top_k >= V), V, top_k)  # [B]
    kth = jnp.take_along_axis(s, (k - 1)[:, None], axis=-1)  # [B, 1]
    x = jnp.where(x >= kth, x, -jnp.inf)
    s = jnp.where(s >= kth, s, -jnp.inf)  # the sorted kept set (ties at the k-th kept)
    p = jax.nn.softmax(s, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p
    n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1, keepdims=True), 1)
    thresh = jnp.take_along_axis(s, n_keep - 1, axis=-1)
    x = jnp.where((top_p[:, None] < 1.0) & (x < thresh), -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p) -> SampleOutput:
    """One token per row of logits [B, V] with per-row settings and keys [B] (typed PRNG keys):
    temperature [B] (0 = greedy: argmax, sample_logprobs 0), top_k [B], top_p [B].

    A row's token depends only on its own logits, key and settings, so a request sampled in a
    batch of others (the serving engine) gets what it gets alone. The sort for top-k / top-p is
    skipped when no row asks for either."""
    logits = logits.astype(jnp.float32)
    base = jax.nn.log_softmax(logits, axis=-1)
    greedy = temperature <= 0.0
    t = jnp.where(greedy, 1.0, temperature)
    truncate = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))
    q = jax.lax.cond(
        truncate,
        lambda: rows_sampling_logprobs(logits, t, top_k, top_p),
        lambda: jax.nn.log_softmax(logits / t[:, None], axis=-1),
    )
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, q).astype(jnp.int32)
    tok = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)
    slp = jnp.where(greedy, 0.0, jnp.take_along_axis(q, tok[:, None], axis=-1)[:, 0])
    lp = jnp.take_along_axis(base, tok[:, None], axis=-1)[:, 0]
    return SampleOutput(tok, lp, slp)
