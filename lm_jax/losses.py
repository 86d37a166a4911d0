"""Losses as pure functions (float32)."""

from __future__ import annotations

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
