"""DPG, KL-adaptive DPG, f-DPG and the baselines on the exact toy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.align import toy as tb
from lm_jax.align.ebm import make_ebm
from lm_jax.align.features import Constraint, feature_matrix, token_sequences_feature

WORD = token_sequences_feature("12", [(1, 2)])


@pytest.fixture(scope="module")
def toy():
    a = tb.init_table(jax.random.key(1))  # Z = 0.17: floor -log Z = 1.75
    xs = tb.all_sequences()
    phi_all = feature_matrix([WORD], xs, jnp.ones(xs.shape))
    ebm = make_ebm([Constraint(WORD)])
    log_a_all = tb.logprob(a, xs)
    return dict(
        a=a,
        xs=xs,
        phi_all=phi_all,
        ebm=ebm,
        log_a_all=log_a_all,
        log_p_all=ebm.log_score(log_a_all, phi_all),
    )


def evaluate(toy, table):
    log_pi_all = tb.logprob(table, toy["xs"])
    ex = tb.exact(toy["log_p_all"], log_pi_all, toy["log_a_all"])
    ex["phi_pi"] = float(jnp.exp(log_pi_all) @ toy["phi_all"][:, 0])
    ex["floor"] = -np.log(ex["z"])
    return ex


def test_dpg_reaches_target_above_floor(toy):
    state, m = tb.train(toy["a"], [WORD], toy["ebm"], "dpg", steps=600)
    ex = evaluate(toy, state.params)
    print("dpg", ex)
    assert ex["kl_p_pi"] <= 0.02 and ex["phi_pi"] >= 0.99
    # Pythagorean floor: exact for the constraint level reached, m = E_pi[phi] < 1 ...
    m, z = ex["phi_pi"], ex["z"]
    kl_min = m * np.log(m / z) + (1 - m) * np.log((1 - m) / (1 - z))
    assert ex["kl_pi_a"] >= kl_min - 1e-6
    # ... and within 1% of -log Z
    assert ex["kl_pi_a"] >= 0.99 * ex["floor"]
    assert int(state.skipped) == 0


def test_reinforce_overshoots_floor(toy):
    state, _ = tb.train(toy["a"], [WORD], toy["ebm"], "reinforce", steps=300)  # R = phi, Adam
    ex = evaluate(toy, state.params)
    print("reinforce", ex)
    assert ex["phi_pi"] >= 0.99 and ex["kl_pi_a"] >= 2 * ex["floor"]


@pytest.mark.parametrize(
    "method", ["kl_dpg", "fdpg_fkl", "fdpg_rkl", "fdpg_tv", "fdpg_js", "fdpg_chi2", "kl_pg"]
)
def test_other_methods_improve(toy, method):
    state, m = tb.train(toy["a"], [WORD], toy["ebm"], method, steps=150, kl_adaptive_every=5)
    ex = evaluate(toy, state.params)
    ex0 = evaluate(toy, toy["a"])
    print(method, ex, {k: np.asarray(v[-1]).tolist() for k, v in m.items()})
    assert np.all(np.isfinite(np.asarray(m["kl_pi_a"])))
    assert ex["phi_pi"] > ex0["phi_pi"] + 0.3
    if method != "kl_pg":
        assert ex["kl_p_pi"] < 0.25 * ex0["kl_p_pi"]
    if method == "kl_dpg":
        assert int(state.proposal_updates) > 0
