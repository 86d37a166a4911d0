"""Losses as pure functions (float32)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array,  # [B, T, V]
    targets: jax.Array,  # [B, T] int
    mask: jax.Array | None = None,  # [B, T] 1 = counted
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed next-token NLL, summed z-loss (z * log(Z)^2) and token count, all float32.

    Returned as sums so gradient accumulation and sharded evaluation divide once by the
    global token count.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit  # [B, T]
    if mask is None:
        mask = jnp.ones_like(nll)
    mask = mask.astype(jnp.float32)
    return (
        jnp.sum(nll * mask),
        jnp.sum(z_loss * jnp.square(log_z) * mask),
        jnp.sum(mask),
    )


def token_log_probs(
    logits: jax.Array,  # [B, T, V]
    targets: jax.Array,  # [B, T] int
    candidates: jax.Array | None = None,  # [B, K] int: token ids read at every position
    greedy: bool = False,
):
    """log softmax(logits) at `targets`: [B, T] float32; with `candidates` also at each row's
    candidate ids: ([B, T], [B, T, K]). Only log Z [B, T] is reduced over V; no [B, T, V]
    log-softmax is formed. `greedy=True`: always the triple (targets [B, T], candidates
    [B, T, K] or None, is_max [B, T] bool: the target is a most likely token)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    tgt_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    tgt = tgt_logit - log_z
    cand = None
    if candidates is not None:
        B, T, _ = logits.shape
        idx = jnp.broadcast_to(candidates[:, None, :], (B, T, candidates.shape[-1]))
        cand = jnp.take_along_axis(logits, idx, axis=-1) - log_z[..., None]
    if greedy:
        return tgt, cand, tgt_logit >= jnp.max(logits, axis=-1)
    return tgt if cand is None else (tgt, cand)


def chunked_token_log_probs(
    hidden: jax.Array,  # [B, T, D] final-norm activations
    logits_fn: Callable[[jax.Array], jax.Array],  # [B, c, D] -> [B, c, V]
    targets: jax.Array,  # [B, T] int
    chunk: int,
    candidates: jax.Array | None = None,  # [B, K] int
    greedy: bool = False,
):
    """`token_log_probs(logits_fn(hidden), targets, candidates, greedy)` made `chunk` positions
    at a time.

    A scan over T / chunk slices of the sequence axis (the batch axis, and its sharding, stay
    whole); each step is rematerialised, so neither the forward nor the backward pass holds more
    than [B, chunk, V] logits, and gradients flow to `hidden` and the head's weights. T is padded
    up to a multiple of `chunk` (the padded positions are cut from the outputs).
    """
    B, T, _ = hidden.shape
    pad = -T % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (T + pad) // chunk

    def split(x):  # [B, n * c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    def merge(x):  # [n, B, c, ...] -> [B, T, ...]
        return jnp.moveaxis(x, 0, 1).reshape(B, n * chunk, *x.shape[3:])[:, :T]

    @jax.checkpoint
    def step(cand, xs):
        h, t = xs
        return cand, token_log_probs(logits_fn(h), t, cand, greedy)

    _, out = jax.lax.scan(step, candidates, (split(hidden), split(targets)))
    return jax.tree.map(merge, out)


def chunked_cross_entropy(
    hidden: jax.Array,  # [B, T, D] final-norm activations
    logits_fn: Callable[[jax.Array], jax.Array],  # [B, c, D] -> [B, c, V]
    targets: jax.Array,  # [B, T] int
    mask: jax.Array | None,  # [B, T]
    z_loss: float,
    chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cross_entropy(logits_fn(hidden), ...)` computed `chunk` positions at a time.

    A scan over T / chunk slices of the sequence axis (the batch axis, and its sharding, stay
    whole); each step is rematerialised, so neither pass holds more than [B, chunk, V] logits.
    The head's weight gradient accumulates across the scan. T is padded up to a multiple of
    `chunk` with masked positions. Same sums as `cross_entropy`, up to summation order.
    """
    B, T, D = hidden.shape
    mask = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
    pad = -T % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n = (T + pad) // chunk

    def split(x):  # [B, n * c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def step(carry, xs):
        h, t, m = xs
        sums = cross_entropy(logits_fn(h), t, m, z_loss)
        return jax.tree.map(jnp.add, carry, sums), None

    zero = jnp.zeros((), jnp.float32)
    out, _ = jax.lax.scan(step, (zero, zero, zero), (split(hidden), split(targets), split(mask)))
    return out


def label_smoothed_nll(
    logits: jax.Array,  # [B, T, V]
    targets: jax.Array,  # [B, T] int
    mask: jax.Array,  # [B, T] 1 = counted
    smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed label-smoothed loss, summed NLL, token count), float32. The smoothed target puts
    1 - smoothing on the label and smoothing spread evenly over the V classes (label included),
    as torch's `cross_entropy(label_smoothing=...)`: loss = (1 - e) NLL + e mean_v(-log p_v)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    uniform = -jnp.mean(logp, axis=-1)
    m = mask.astype(jnp.float32)
    loss = (1.0 - smoothing) * nll + smoothing * uniform
    return jnp.sum(loss * m), jnp.sum(nll * m), jnp.sum(m)
