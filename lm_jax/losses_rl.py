"""GRPO's maths as pure functions (float32), defined as TRL 1.16's `GRPOTrainer` computes them.

Shapes: B completions = P prompts x G generations, grouped contiguously (rows g*G .. g*G+G-1
share a prompt); T positions per row. Per-token arrays are [B, T] and read only where
`mask` [B, T] is 1 (the completion tokens, the end-of-sequence token included); anything may
sit elsewhere.

Advantages (`group_advantages`, TRL `_generate_and_score_completions`, "sum_then_normalize"):
  A_i = r_i - mean_group(r),  then / (std + 1e-4) unless scale_rewards == "none";
  std: per group ("group") or over the whole batch ("batch"), Bessel-corrected (TRL's
  `nanstd`); a group of G = 1 has std 0.

Loss (`grpo_loss`, TRL `_compute_loss`, importance_sampling_level="token"):
  ratio_t = exp(logp_t - old_t)   (old = stop_gradient(logp) when no old log-probs are given:
                                  one update per batch, TRL's num_iterations = 1 shortcut)
  l_t = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A) + beta kl_t
  kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (the k3 estimator of KL(pi || ref))
         * ratio_t with kl_bias_correction (TRL 1.16's default `use_bias_correction_kl`: the
         importance-weighted k3, whose gradient is unbiased off-policy; arXiv 2512.02556)
  grpo:     mean over rows of (sum_t l_t m_t / max(1, sum_t m_t))   (per-sequence normalised)
  bnpo:     sum l m / max(1, sum m)                                 (per-token, over the batch)
  dr_grpo:  sum l m / (B * max_completion_length)                   (a constant normaliser)
Dr. GRPO (Liu et al. 2025) also drops the std normalisation: scale_rewards="none".
Metrics (no gradient) as TRL logs them: kl (masked token mean), clip_ratio/low_mean,
clip_ratio/high_mean, clip_ratio/region_mean (tokens whose ratio left the clip range on the side
where clipping binds), plus the ratio's masked mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm_jax.errors import ConfigError

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def default_scale_rewards(loss_type: str) -> str:
    """Dr. GRPO drops the std normalisation; the others scale by the group's std."""
    return "none" if loss_type == "dr_grpo" else "group"


def _std(x: jax.Array, axis=None) -> jax.Array:
    """Bessel-corrected std (0 where fewer than 2 values, as TRL treats G = 1)."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=True))
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True) * (n / (n - 1))
    return jnp.sqrt(var)


def group_advantages(
    rewards: jax.Array, num_generations: int, scale_rewards: str = "group"
) -> tuple[jax.Array, dict]:
    """(advantages [B], metrics) from rewards [B] in groups of `num_generations` rows.
    Metrics: reward (mean), reward_std (over the batch), frac_reward_zero_std (share of rows
    whose std is 0: groups that teach nothing)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(
            f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}."
        )
    r = jnp.asarray(rewards, jnp.float32)
    G = int(num_generations)
    if r.ndim != 1 or r.shape[0] % G:
        raise ConfigError(f"rewards [B] must split into groups of {G}, got shape {r.shape}.")
    grouped = r.reshape(-1, G)  # [P, G]
    mean = jnp.repeat(jnp.mean(grouped, axis=1), G)  # [B]
    if scale_rewards == "batch":
        std = jnp.broadcast_to(_std(r), r.shape)
    else:  # "group"; with "none" only for the zero-std statistic
        std = jnp.repeat(_std(grouped, axis=1)[:, 0], G)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + STD_EPS)
    metrics = {
        "reward": jnp.mean(r),
        "reward_std": _std(r).reshape(()),
        "frac_reward_zero_std": jnp.mean(jnp.isclose(std, 0.0).astype(jnp.float32)),
    }
    return adv, metrics


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, [B, T]."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


def grpo_loss(
    logps: jax.Array,  # [B, T] policy log-probs of the completion tokens (differentiated)
    advantages: jax.Array,  # [B]
    mask: jax.Array,  # [B, T] 1 at completion tokens
    *,
    old_logps: jax.Array | None = None,  # [B, T] log-probs under the sampling policy
    ref_logps: jax.Array | None = None,  # [B, T] log-probs under the reference (beta > 0)
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,  # None: epsilon_low
    beta: float = 0.0,
    max_completion_length: int | None = None,  # dr_grpo's constant
    kl_bias_correction: bool = True,  # k3 * ratio (TRL's use_bias_correction_kl default)
) -> tuple[jax.Array, dict]:
    """GRPO's clipped surrogate (+ beta * k3 KL): (scalar loss, metrics with 'loss')."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {loss_type!r}: choose one of {list(LOSS_TYPES)}.")
    if beta and ref_logps is None:
        raise ConfigError("beta > 0 needs the reference model's log-probs.")
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high
    logps = jnp.asarray(logps, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]  # [B, 1]
    old = jax.lax.stop_gradient(logps) if old_logps is None else jnp.asarray(old_logps, jnp.float32)
    ratio = jnp.exp(logps - old)  # [B, T]
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + eps_hi)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta:
        kl = k3_kl(logps, jnp.asarray(ref_logps, jnp.float32))
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    per_token = jnp.where(m > 0, per_token, 0.0)  # padding may hold anything (NaN included)
    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))
    elif loss_type == "bnpo":
        loss = jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)
    else:  # dr_grpo
        if not max_completion_length:
            raise ConfigError("dr_grpo needs max_completion_length (its constant normaliser).")
        loss = jnp.sum(per_token * m) / (logps.shape[0] * max_completion_length)

    def masked_mean(x):
        x = jnp.where(m > 0, jax.lax.stop_gradient(x).astype(jnp.float32), 0.0)
        return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)

    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + eps_hi) & (adv > 0)
    metrics = {
        "loss": loss,
        "clip_ratio/low_mean": masked_mean(low),
        "clip_ratio/high_mean": masked_mean(high),
        "clip_ratio/region_mean": masked_mean(low | high),
        "ratio": masked_mean(ratio),
    }
    if kl is not None:
        metrics["kl"] = masked_mean(kl)
    return loss, metrics
