"""Samplers: ancestral sampling through the KV-cache generator, quasi-rejection sampling (QRS).

`ancestral` returns tokens, their mask and log q(x) (the sampling density of each continuation,
one pass: the generator scores every token it draws). `qrs` (Eikema et al. 2022) accepts x ~ q
with probability min(1, P(x) / (beta q(x))); accepted samples follow
p_beta(x) ∝ min(q(x), P(x)/beta), which tends to p as beta grows, and the acceptance rate is
Z_beta / beta with Z_beta = sum_x min(beta q(x), P(x)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.generate import generate
from lm_jax.sharding import batch_sharding


@flax.struct.dataclass
class Samples:
    tokens: jax.Array  # [B, T] generated tokens (prompt excluded), padding after the end
    mask: jax.Array  # [B, T] 1 on generated tokens (the stop token included)
    log_q: jax.Array  # [B] log density of the sampling distribution
    prompt: jax.Array  # [B, P] the prompt the continuation is conditioned on


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    max_new_tokens: int = 32
    stop_tokens: tuple[int, ...] = ()
    prompt: tuple[int, ...] = (0,)  # token ids every sample is conditioned on (BOS / newline)


def ancestral(model_cfg, params, key: jax.Array, batch_size: int, scfg: SamplerConfig) -> Samples:
    """Ancestral samples at temperature 1 (no top-k/p: log q must be the model's own density)
    through `lm_jax.generate.generate` (KV cache: tokens and log pi in one pass)."""
    prompt = jnp.broadcast_to(jnp.asarray(scfg.prompt, jnp.int32), (batch_size, len(scfg.prompt)))
    out = generate(
        model_cfg,
        params,
        prompt,
        key,
        scfg.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        stop_tokens=tuple(scfg.stop_tokens),
    )
    T = out.tokens.shape[1]
    mask = (jnp.arange(T)[None, :] < out.lengths[:, None]).astype(jnp.float32)  # [B, T]
    log_q = jnp.sum(jnp.where(mask > 0, out.logprobs, 0.0), axis=1)
    return Samples(out.tokens, mask, log_q, prompt)


def qrs_accept(key: jax.Array, log_p: jax.Array, log_q: jax.Array, log_beta) -> jax.Array:
    """Accept each x ~ q with probability min(1, P / (beta q)): [B] bool."""
    log_acc = jnp.minimum(0.0, log_p - log_beta - log_q)
    u = jax.random.uniform(key, log_p.shape)
    return jnp.log(u) < log_acc


def qrs_acceptance_rate(log_p: jax.Array, log_q: jax.Array, log_beta) -> jax.Array:
    """E_q[min(1, P/(beta q))] estimated on samples of q (= Z_beta / beta)."""
    return jnp.mean(jnp.exp(jnp.minimum(0.0, log_p - log_beta - log_q)))


def qrs(key, log_p, log_q, log_beta, items: Sequence | None = None):
    """(accepted mask [B], acceptance rate, accepted items if given as [B, ...] arrays)."""
    acc = qrs_accept(key, log_p, log_q, log_beta)
    rate = jnp.mean(acc.astype(jnp.float32))
    if items is None:
        return acc, rate
    keep = np.asarray(acc)
    return acc, rate, [np.asarray(x)[keep] for x in items]


def shard_batch(batch, mesh):
    """Place every [B, ...] leaf with its batch dimension over the data-parallel mesh axes."""
    if mesh is None:
        return batch
    return jax.tree.map(
        lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x), np.shape(x)[0])), batch
    )
