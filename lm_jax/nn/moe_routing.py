"""Mixture-of-experts routing (pure): token choice, capacity slots and masks, expert choice,
and the router's auxiliary losses (Switch load balance, z-loss) and checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def token_choice(logits, top_k: int, mode: str, renormalize: bool = True):
    """Top-k token choice. logits [..., E] f32 -> (weights [..., K] f32, ids [..., K] int32).

    softmax_topk: softmax over E, keep the top k (renormalised to sum 1 as Mixtral, or raw
    probabilities as Switch top-1); topk_softmax: top k logits, softmax over those k.
    """
    if mode == "topk_softmax":
        vals, ids = jax.lax.top_k(logits, top_k)  # [..., K]
        return jax.nn.softmax(vals, axis=-1), ids
    vals, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # [..., K]
    if renormalize:
        vals = vals / jnp.sum(vals, axis=-1, keepdims=True)
    return vals, ids


def capacity(factor: float, group_size: int, top_k: int, num_experts: int) -> int:
    """Tokens per expert per group: ceil(factor * S * K / E), within [1, S]."""
    return int(min(group_size, max(1, math.ceil(factor * group_size * top_k / num_experts))))


def capacity_slots(ids, num_experts: int):
    """ids [G, S, K] -> each choice's slot index within its expert's queue [G, S, K]: slots go
    to every token's 1st choice (by position), then every 2nd choice, ... (priority order)."""
    G, S, K = ids.shape
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32)  # [G, S, K, E]
    by_priority = onehot.transpose(0, 2, 1, 3).reshape(G, K * S, num_experts)  # [G, K*S, E]
    pos = jnp.cumsum(by_priority, axis=1) - 1  # [G, K*S, E] slot index within its expert
    pos = pos.reshape(G, K, S, num_experts).transpose(0, 2, 1, 3)  # [G, S, K, E]
    return jnp.sum(pos * onehot, axis=-1)  # [G, S, K]


def capacity_masks(ids, weights, num_experts: int, cap: int):
    """GShard/Switch dispatch and combine tensors with priority-ordered dropping.

    ids, weights [G, S, K] -> dispatch (0/1), combine (gate weights) [G, S, E, C]. Slots are
    handed out to every token's 1st choice (by position), then every 2nd choice, ...; a choice
    whose expert is already full (C slots) is dropped.
    """
    pos = capacity_slots(ids, num_experts)  # [G, S, K]
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)  # [G, S, K, E]
    slot = jax.nn.one_hot(jnp.where(pos < cap, pos, cap), cap, dtype=jnp.float32)  # [G, S, K, C]
    dispatch = jnp.einsum("gske,gskc->gsec", onehot, slot)  # [G, S, E, C]
    combine = jnp.einsum("gske,gskc->gsec", onehot * weights[..., None], slot)  # [G, S, E, C]
    return dispatch, combine


def expert_choice_masks(probs, cap: int):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    probs [G, S, E] (softmax over experts) -> dispatch, combine [G, S, E, C].
    """
    S = probs.shape[1]
    vals, idx = jax.lax.top_k(probs.transpose(0, 2, 1), cap)  # [G, E, C]
    dispatch = jax.nn.one_hot(idx, S, dtype=jnp.float32).transpose(0, 3, 1, 2)  # [G, S, E, C]
    return dispatch, dispatch * vals[:, None]  # [G, S, E, C]


def load_balance_loss(probs, load):
    """Switch: E * sum_i f_i * P_i with f = `load` [E] (sums to 1) and P = mean probs [E].
    1 at perfectly balanced load; the gradient flows through P only."""
    P_mean = jnp.mean(probs.reshape(-1, probs.shape[-1]), axis=0)  # [E]
    return probs.shape[-1] * jnp.sum(jax.lax.stop_gradient(load) * P_mean)


def router_z_loss(logits):
    """ST-MoE: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def router_entropy(probs):
    return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1))


def check_router_logits(logits) -> None:
    """Raise on NaN router logits when they are concrete (eager). Under tracing the NaN is
    propagated to the block's output and losses instead (see `MoE`), never routed silently."""
    if isinstance(logits, jax.core.Tracer):
        return
    bad = int(np.isnan(np.asarray(logits)).any(-1).sum())
    if bad:
        raise FloatingPointError(
            f"MoE router produced NaN logits for {bad} token(s): the hidden states or the router "
            "kernel contain NaN/inf; check the inputs, the learning rate and the loss history."
        )
