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


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets]: [B, T, V], [B, T] -> [B, T] float32."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


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
