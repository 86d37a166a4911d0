"""Preference-optimisation losses as pure functions of sequence log-probabilities (float32).

Every input is one number per preference pair, shape [B]: the summed log-probability of the
chosen / rejected completion given the prompt, under the policy and (DPO, IPO) the frozen
reference, and the completion token counts (IPO, SimPO). Each loss returns (loss, metrics): the
loss is the mean over the B pairs; the metrics (no gradient) are means too:

  reward_chosen / reward_rejected  the implicit rewards (DPO, IPO: beta * (log pi - log ref)
                                   summed over the completion; SimPO: beta * mean token log pi)
  reward_margin                    reward_chosen - reward_rejected
  accuracy                         share of pairs with reward_chosen > reward_rejected (a tie
                                   counts as wrong, as in TRL)
  logp_chosen / logp_rejected      the policy's summed log-probs

Losses (z is the preference logit):
  DPO (Rafailov et al. 2023), sigmoid:  z = (pc - rc) - (pr - rr),
      loss = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
      (eps = label_smoothing: the conservative DPO of Mitchell 2023; eps = 0 is TRL's "sigmoid")
  IPO (Azar et al. 2023) as TRL computes it: log-ratios averaged per completion token,
      z = (pc - rc) / |c| - (pr - rr) / |r|,  loss = (z - 1 / (2 beta))^2
  SimPO (Meng et al. 2024), reference-free: z = beta (pc / |c| - pr / |r|) - gamma,
      loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm_jax.errors import ConfigError

METHODS = ("dpo", "ipo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}
DEFAULT_GAMMA = 1.0  # SimPO's target margin: gamma / beta = 0.5, the paper's suggested ratio


class PairLogps(NamedTuple):
    """Completion log-probs of B preference pairs under one model."""

    chosen: jax.Array  # [B] sum of log p(chosen token) over the chosen completion
    rejected: jax.Array  # [B] the same over the rejected completion
    chosen_counts: jax.Array  # [B] chosen completion tokens
    rejected_counts: jax.Array  # [B] rejected completion tokens


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


def sigmoid_loss(z: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z) per pair: [B] -> [B]."""
    loss = -jax.nn.log_sigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-z)
    return loss


def _metrics(reward_chosen, reward_rejected, logp_chosen, logp_rejected) -> dict:
    rc, rr = jax.lax.stop_gradient(reward_chosen), jax.lax.stop_gradient(reward_rejected)
    return {
        "reward_chosen": jnp.mean(rc),
        "reward_rejected": jnp.mean(rr),
        "reward_margin": jnp.mean(rc - rr),
        "accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
        "logp_chosen": jnp.mean(jax.lax.stop_gradient(logp_chosen)),
        "logp_rejected": jnp.mean(jax.lax.stop_gradient(logp_rejected)),
    }


def dpo_loss(
    chosen_logps: jax.Array,  # [B] policy
    rejected_logps: jax.Array,  # [B] policy
    ref_chosen_logps: jax.Array,  # [B] reference
    ref_rejected_logps: jax.Array,  # [B] reference
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
    """DPO's sigmoid loss (conservative with `label_smoothing` > 0): (scalar, metrics)."""
    pc, pr, rc, rr = _f32(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr  # [B]
    loss = sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return jnp.mean(loss), _metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def ipo_loss(
    chosen_logps: jax.Array,  # [B] policy
    rejected_logps: jax.Array,  # [B] policy
    ref_chosen_logps: jax.Array,  # [B] reference
    ref_rejected_logps: jax.Array,  # [B] reference
    chosen_counts: jax.Array,  # [B] completion tokens
    rejected_counts: jax.Array,  # [B]
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, dict]:
    """IPO's squared loss on per-token log-ratios (TRL's length normalisation; counts are
    clamped to >= 1): (scalar, metrics)."""
    pc, pr, rc, rr = _f32(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    nc, nr = (jnp.maximum(n, 1.0) for n in _f32(chosen_counts, rejected_counts))
    chosen_ratio, rejected_ratio = pc - rc, pr - rr  # [B]
    z = chosen_ratio / nc - rejected_ratio / nr
    loss = jnp.square(z - 1.0 / (2.0 * beta))
    return jnp.mean(loss), _metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def simpo_loss(
    chosen_logps: jax.Array,  # [B] policy
    rejected_logps: jax.Array,  # [B] policy
    chosen_counts: jax.Array,  # [B] completion tokens
    rejected_counts: jax.Array,  # [B]
    *,
    beta: float = 2.0,
    gamma: float = DEFAULT_GAMMA,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
    """SimPO: a sigmoid loss on length-normalised log-probs with target margin `gamma`, no
    reference model: (scalar, metrics)."""
    pc, pr = _f32(chosen_logps, rejected_logps)
    nc, nr = (jnp.maximum(n, 1.0) for n in _f32(chosen_counts, rejected_counts))
    reward_chosen, reward_rejected = beta * pc / nc, beta * pr / nr  # [B]
    loss = sigmoid_loss(reward_chosen - reward_rejected - gamma, label_smoothing)
    return jnp.mean(loss), _metrics(reward_chosen, reward_rejected, pc, pr)


def needs_reference(method: str) -> bool:
    check_method(method)
    return method != "simpo"


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown preference method {method!r}: choose one of {list(METHODS)}.")


def preference_loss(
    method: str,
    policy: PairLogps,
    reference: PairLogps | None = None,
    *,
    beta: float | None = None,
    gamma: float | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
    """`method`'s loss ('dpo', 'ipo' or 'simpo') of [B] pairs: (scalar, metrics with 'loss').
    `beta` / `gamma` None: the method's defaults (DEFAULT_BETA, DEFAULT_GAMMA)."""
    check_method(method)
    beta = DEFAULT_BETA[method] if beta is None else beta
    if method == "simpo":
        gamma = DEFAULT_GAMMA if gamma is None else gamma
        loss, m = simpo_loss(*policy, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    else:
        if reference is None:
            raise ConfigError(f"{method} needs the reference model's log-probs.")
        pair = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
        if method == "dpo":
            loss, m = dpo_loss(*pair, beta=beta, label_smoothing=label_smoothing)
        else:
            loss, m = ipo_loss(*pair, policy.chosen_counts, policy.rejected_counts, beta=beta)
    return loss, {"loss": loss, **m}
