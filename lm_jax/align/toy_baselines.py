"""The reward-side post-training baselines on the exact toy (`lm_jax.align.toy`), beside the
distributional tuners: DPO on pairs of base samples ranked by the constraint's score, and
GRPO with the constraint as reward. Same tabular policy, base a, optimizer and samples per step
as `toy.train`, so the exact metrics of the final policies compare like for like.

- DPO (offline, `losses_preference.dpo_loss`): each step draws `batch` samples from a, pairs
  them (2i, 2i+1), keeps the pairs whose scores differ (chosen = the higher phi), reference = a.
- GRPO (online, `losses_rl`): each step draws `batch` samples from the current policy in
  groups of `num_generations` (the toy has one empty prompt, so a group is G samples of it),
  group-normalised advantages of phi, `num_iterations` clipped updates on that batch (the
  sampling policy's log-probs as old_logps), beta * k3 KL to a.
Both run every step inside one jitted `lax.scan`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lm_jax.align import toy as tb
from lm_jax.align.features import feature_matrix
from lm_jax.losses_preference import dpo_loss
from lm_jax.losses_rl import group_advantages, grpo_loss


def token_logprobs(table, tokens):
    """Per-position log pi(x_t | x_<t): [B, T] (sums to `toy.logprob`)."""
    logp = jax.nn.log_softmax(table[tb.prefix_rows(tokens)], axis=-1)  # [B, T, V]
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def _phi(features, x):
    return feature_matrix(features, x, jnp.ones(x.shape, jnp.float32))[:, 0]


def train_dpo(a, features, steps=300, batch=256, lr=0.1, beta=0.1, seed=0):
    """DPO from `a` on pairs of a's samples ranked by the first feature: (table, metrics)."""
    tx = optax.adam(lr)

    def loss_fn(params, chosen, rejected, ref_c, ref_r, keep):
        pc, pr = tb.logprob(params, chosen), tb.logprob(params, rejected)
        losses = jax.vmap(lambda *z: dpo_loss(*z, beta=beta)[0])(pc, pr, ref_c, ref_r)
        return jnp.sum(losses * keep) / jnp.maximum(jnp.sum(keep), 1.0)

    def body(carry, key):
        params, opt = carry
        x, _ = tb.sample(a, key, batch)
        phi = _phi(features, x)
        x1, x2, f1, f2 = x[0::2], x[1::2], phi[0::2], phi[1::2]
        first = (f1 > f2)[:, None]
        chosen, rejected = jnp.where(first, x1, x2), jnp.where(first, x2, x1)
        keep = (f1 != f2).astype(jnp.float32)
        ref_c, ref_r = tb.logprob(a, chosen), tb.logprob(a, rejected)
        loss, g = jax.value_and_grad(loss_fn)(params, chosen, rejected, ref_c, ref_r, keep)
        upd, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), opt), {"loss": loss, "pairs": jnp.sum(keep)}

    run = jax.jit(functools.partial(jax.lax.scan, body))
    (params, _), m = run((a, tx.init(a)), jax.random.split(jax.random.key(seed), steps))
    return params, m


def train_grpo(
    a, features, steps=300, batch=256, lr=0.1, num_generations=8, num_iterations=2,
    beta=0.04, epsilon=0.2, loss_type="grpo", seed=0,
):  # fmt: skip
    """GRPO from `a` with reward = the first feature: (table, metrics)."""
    tx = optax.adam(lr)
    scale = "none" if loss_type == "dr_grpo" else "group"

    def loss_fn(params, x, adv, old, ref):
        lp = token_logprobs(params, x)
        mask = jnp.ones(x.shape, jnp.float32)
        return grpo_loss(
            lp, adv, mask, old_logps=old, ref_logps=ref, loss_type=loss_type,
            epsilon_low=epsilon, beta=beta, max_completion_length=x.shape[1],
        )  # fmt: skip

    def body(carry, key):
        params, opt = carry
        x, _ = tb.sample(params, key, batch)
        adv, stats = group_advantages(_phi(features, x), num_generations, scale)
        old, ref = token_logprobs(params, x), token_logprobs(a, x)
        for _ in range(num_iterations):
            (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, adv, old, ref)
            upd, opt = tx.update(g, opt, params)
            params = optax.apply_updates(params, upd)
        return (params, opt), {"loss": loss, "reward": stats["reward"]}

    run = jax.jit(functools.partial(jax.lax.scan, body))
    (params, _), m = run((a, tx.init(a)), jax.random.split(jax.random.key(seed), steps))
    return params, m
