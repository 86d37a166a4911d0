"""An exact toy for testing alignment: a tabular autoregressive policy over V tokens and T
positions (one logits row per prefix, so any distribution is representable), small enough to
enumerate all V^T sequences and compute Z, KL and TVD exactly. `train` runs any tuner on it with
every step (sample -> score -> step) inside one jitted `lax.scan`."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm_jax.align.features import feature_matrix
from lm_jax.align.tuners import TunerConfig, init_state, make_step

V, T = 4, 4
OFFSETS = np.array([(V**t - 1) // (V - 1) for t in range(T)], np.int32)  # first row per depth
ROWS = int(OFFSETS[-1] + V ** (T - 1))


def init_table(key, scale=1.0):
    return scale * jax.random.normal(key, (ROWS, V), jnp.float32)  # [prefixes, V]


def prefix_rows(tokens):
    """Row of the logits table each position reads: [B, T] -> [B, T]."""
    vals = [jnp.zeros(tokens.shape[:1], jnp.int32)]
    for t in range(1, T):
        vals.append(vals[-1] * V + tokens[:, t - 1])
    return jnp.stack(vals, axis=1) + OFFSETS[None, :]


def logprob(table, tokens):
    """log pi(x): [B, T] -> [B]."""
    logp = jax.nn.log_softmax(table[prefix_rows(tokens)], axis=-1)  # [B, T, V]
    return jnp.sum(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], axis=1)


def logprob_fn(params, frozen, tokens, mask):
    del frozen, mask
    return logprob(params, tokens)


def sample(table, key, n):
    """Ancestral samples with their log pi: ([n, T], [n])."""
    keys = jax.random.split(key, T)
    val = jnp.zeros((n,), jnp.int32)
    toks, lp = [], jnp.zeros((n,), jnp.float32)
    for t in range(T):
        logits = jax.nn.log_softmax(table[OFFSETS[t] + val], axis=-1)  # [n, V]
        x = jax.random.categorical(keys[t], logits)
        lp = lp + jnp.take_along_axis(logits, x[:, None], axis=1)[:, 0]
        toks.append(x)
        val = val * V + x
    return jnp.stack(toks, axis=1), lp


def all_sequences():
    return jnp.asarray(list(itertools.product(range(V), repeat=T)), jnp.int32)  # [V^T, T]


def exact(log_p_all, log_pi_all, log_a_all):
    """Exact Z, KL(p||pi), TVD(p, pi), KL(pi||a) from log P, log pi, log a over all sequences."""
    log_p_all, log_pi_all, log_a_all = (
        np.asarray(x, np.float64) for x in (log_p_all, log_pi_all, log_a_all)
    )
    z = np.exp(log_p_all).sum()
    p = np.exp(log_p_all) / z
    pi = np.exp(log_pi_all)
    nz = p > 0
    kl = float(np.sum(p[nz] * (np.log(p[nz]) - log_pi_all[nz])))
    tvd = 0.5 * float(np.abs(p - pi).sum())
    kl_pi_a = float(np.sum(pi * (log_pi_all - log_a_all)))
    return {"z": float(z), "kl_p_pi": kl, "tvd": tvd, "kl_pi_a": kl_pi_a}


def train(a, features, ebm, method, steps=300, batch=256, lr=0.1, seed=0, **kw):
    """Tune the table `a` (also the base) with `method`: (final AlignState, per-step metrics)."""
    cfg = TunerConfig(method, **kw)
    tx = optax.adam(lr)
    step = make_step(cfg, tx, logprob_fn)
    state = init_state(a, tx, cfg)

    def body(state, key):
        sampler = state.proposal if cfg.off_policy else state.params
        x, log_q = sample(sampler, key, batch)
        mask = jnp.ones(x.shape, jnp.float32)
        b = dict(
            tokens=x,
            mask=mask,
            log_q=log_q,
            log_a=logprob(a, x),
            phi=feature_matrix(features, x, mask),
        )
        state, m = step(state, b, None, ebm)
        return state, {k: m[k] for k in ("kl_p_pi", "kl_pi_a", "phi_pi", "skipped")}

    run = jax.jit(functools.partial(jax.lax.scan, body))
    return run(state, jax.random.split(jax.random.key(seed), steps))
