"""A DPG step on 8 CPU devices equals the single-device step; bad input gives clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm_jax.align import (
    Constraint,
    MomentError,
    TunerConfig,
    feature_matrix,
    fit_ebm,
    init_state,
    jit_align_step,
    make_ebm,
    token_sequences_feature,
)
from lm_jax.align import toy as tb
from lm_jax.align.samplers import shard_batch
from lm_jax.sharding import make_mesh

WORD = token_sequences_feature("12", [(1, 2)])
NEVER = token_sequences_feature("never", [(9,)])  # token 9 is outside the toy's vocabulary


def _batch(a, pi, n=64, seed=0):
    x, log_q = tb.sample(pi, jax.random.key(seed), n)
    mask = jnp.ones(x.shape, jnp.float32)
    return dict(
        tokens=x,
        mask=mask,
        log_q=log_q,
        log_a=tb.logprob(a, x),
        phi=feature_matrix([WORD], x, mask),
    )


@pytest.mark.parametrize("method", ["dpg", "kl_dpg"])
def test_dpg_step_8_devices_equals_single(method):
    assert len(jax.devices()) == 8
    a = tb.init_table(jax.random.key(1))
    pi = a + 0.3 * tb.init_table(jax.random.key(2))
    ebm = make_ebm([Constraint(WORD)])
    cfg, tx = TunerConfig(method, kl_adaptive_every=1), optax.adam(0.1)
    batch = _batch(a, pi)
    outs = []
    for mesh in (make_mesh("data:1", jax.devices()[:1]), make_mesh("data:8")):
        step = jit_align_step(cfg, tx, tb.logprob_fn, mesh)
        state = jax.device_put(init_state(jnp.copy(pi), tx, cfg, log_z=-1.5, z_count=64.0))
        b = shard_batch(batch, mesh)
        if mesh.size == 8:
            assert len(b["tokens"].sharding.device_set) == 8
        for _ in range(2):
            state, m = step(state, b, None, ebm)
        outs.append((jax.device_get(state), jax.device_get(m)))
    (s1, m1), (s8, m8) = outs
    np.testing.assert_allclose(s1.params, s8.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1.z.log_sum, s8.z.log_sum, rtol=1e-6)
    for k in ("kl_p_pi", "tvd_p_pi", "kl_pi_a", "loss", "grad_norm"):
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_zero_mass_batch_is_skipped_not_nan():
    a = tb.init_table(jax.random.key(1))
    cons = [Constraint(NEVER)]
    ebm = make_ebm(cons)
    cfg, tx = TunerConfig("dpg"), optax.adam(0.1)
    batch = _batch(a, a)
    batch["phi"] = feature_matrix([NEVER], batch["tokens"], batch["mask"])
    state = init_state(jnp.copy(a), tx, cfg)  # the step donates its state
    state, m = jit_align_step(cfg, tx, tb.logprob_fn)(state, batch, None, ebm)
    assert int(state.skipped) == 1 and int(m["z_skipped"]) == 1
    np.testing.assert_array_equal(state.params, a)
    assert not any(np.isnan(np.asarray(v)).any() for v in jax.device_get(m).values())


def test_constraint_that_never_fires_errors_with_advice():
    a = tb.init_table(jax.random.key(1))
    x, _ = tb.sample(a, jax.random.key(0), 500)
    mask = jnp.ones(x.shape)
    for cons in ([Constraint(NEVER)], [Constraint(WORD), Constraint(NEVER, 0.5)]):
        phi = feature_matrix([c.feature for c in cons], x, mask)
        with pytest.raises(MomentError, match="never fires.*more samples"):
            fit_ebm(make_ebm(cons), cons, phi, tb.logprob(a, x))


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_boolean_targets_outside_unit_interval(target):
    cons = [Constraint(WORD, target)]
    phi = jnp.asarray([[0.0], [1.0]])
    with pytest.raises(MomentError, match=r"outside \(0, 1\)|finite"):
        fit_ebm(make_ebm(cons), cons, phi, jnp.zeros(2))
