"""Train the tabular toy with any tuner: sample -> score -> step, all steps in one jitted scan."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
import tabular as tb

from lm_jax.align.features import feature_matrix
from lm_jax.align.tuners import TunerConfig, init_state, make_step


def train(a, features, ebm, method, steps=300, batch=256, lr=0.1, seed=0, **kw):
    cfg = TunerConfig(method, **kw)
    tx = optax.adam(lr)
    step = make_step(cfg, tx, tb.logprob_fn)
    state = init_state(a, tx, cfg)

    def body(state, key):
        sampler = state.proposal if cfg.off_policy else state.params
        x, log_q = tb.sample(sampler, key, batch)
        mask = jnp.ones(x.shape, jnp.float32)
        b = dict(
            tokens=x,
            mask=mask,
            log_q=log_q,
            log_a=tb.logprob(a, x),
            phi=feature_matrix(features, x, mask),
        )
        state, m = step(state, b, None, ebm)
        return state, {k: m[k] for k in ("kl_p_pi", "kl_pi_a", "phi_pi", "skipped")}

    run = jax.jit(functools.partial(jax.lax.scan, body))
    return run(state, jax.random.split(jax.random.key(seed), steps))
