"""Estimators, moment matching and QRS against exact values on the enumerable toy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.align import estimators as est
from lm_jax.align import toy as tb
from lm_jax.align.ebm import make_ebm
from lm_jax.align.features import Constraint, feature_matrix, token_sequences_feature
from lm_jax.align.moments import fit_ebm, fit_lambda
from lm_jax.align.samplers import qrs_accept, qrs_acceptance_rate

WORD = token_sequences_feature("12", [(1, 2)])
OTHER = token_sequences_feature("3", [(3,)])


@pytest.fixture(scope="module")
def toy():
    a = tb.init_table(jax.random.key(0))
    pi = tb.init_table(jax.random.key(1), 0.7)
    xs = tb.all_sequences()
    ones = jnp.ones(xs.shape, jnp.float32)
    return dict(a=a, pi=pi, xs=xs, phi_all=feature_matrix([WORD], xs, ones))


def test_subsequence_feature_and_mask():
    toks = jnp.asarray([[0, 1, 2, 3], [1, 0, 2, 1], [3, 3, 1, 2]])
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(WORD(toks, mask), [1.0, 0.0, 0.0])


def test_estimators_converge_to_exact(toy):
    ebm = make_ebm([Constraint(WORD)])
    log_a_all = tb.logprob(toy["a"], toy["xs"])
    log_p_all = ebm.log_score(log_a_all, toy["phi_all"])
    ex = tb.exact(log_p_all, tb.logprob(toy["pi"], toy["xs"]), log_a_all)
    assert 0.05 < ex["z"] < 0.5
    errs = {}
    for n in (500, 200_000):
        x, log_q = tb.sample(toy["a"], jax.random.key(n), n)  # q = a
        phi = feature_matrix([WORD], x, jnp.ones(x.shape))
        log_p = ebm.log_score(tb.logprob(toy["a"], x), phi)
        log_pi = tb.logprob(toy["pi"], x)
        got = {
            "z": float(jnp.exp(est.log_z_hat(log_p, log_q))),
            "kl_p_pi": float(est.kl_p_pi(log_p, log_q, log_pi)),
            "tvd": float(est.tvd_p_pi(log_p, log_q, log_pi)),
        }
        errs[n] = {k: abs(got[k] - ex[k]) for k in got}
    big = errs[200_000]
    assert big["z"] < 0.01 * ex["z"] * 3 and big["kl_p_pi"] < 0.02 and big["tvd"] < 0.01, big
    assert sum(big.values()) < sum(errs[500].values())


def test_estimators_zero_mass_batch_not_nan():
    log_p = jnp.full((4,), -jnp.inf)
    log_q = jnp.zeros(4)
    assert float(est.log_z_hat(log_p, log_q)) == -np.inf
    assert float(est.kl_p_pi(log_p, log_q, log_q)) == np.inf
    assert float(est.tvd_p_pi(log_p, log_q, log_q)) == 1.0
    z = est.ZState.create().update(log_p - log_q)
    assert int(z.skipped) == 1 and float(z.log_z) == -np.inf


def test_snis_lambda_closed_form(toy):
    n = 50_000
    x, _ = tb.sample(toy["a"], jax.random.key(3), n)
    phi = feature_matrix([WORD], x, jnp.ones(x.shape))
    mu_a_hat = float(phi.mean())
    log_a_all = tb.logprob(toy["a"], toy["xs"])
    mu_a = float(jnp.sum(jnp.exp(log_a_all) * toy["phi_all"][:, 0]))
    logit = lambda m: np.log(m / (1 - m))  # noqa: E731
    lam, info = fit_lambda(phi, [0.5], tol=1e-5)
    assert info["converged"] and info["iterations"] <= 10
    np.testing.assert_allclose(float(lam[0]), logit(0.5) - logit(mu_a_hat), atol=1e-4)
    np.testing.assert_allclose(float(lam[0]), logit(0.5) - logit(mu_a), atol=0.05)
    lam_g, _ = fit_lambda(phi, [0.5], method="gradient", lr=4.0, tol=1e-5, max_iter=2000)
    np.testing.assert_allclose(float(lam_g[0]), float(lam[0]), atol=1e-3)


def test_two_moments_with_pointwise(toy):
    """Pointwise WORD plus E[OTHER] = 0.5: exact E_p[OTHER] from the fitted EBM matches."""
    cons = [Constraint(WORD), Constraint(OTHER, 0.5)]
    x, log_q = tb.sample(toy["a"], jax.random.key(4), 50_000)
    phi = feature_matrix([WORD, OTHER], x, jnp.ones(x.shape))
    ebm, info = fit_ebm(make_ebm(cons), cons, phi, tb.logprob(toy["a"], x), log_q)
    assert info["converged"]
    ones = jnp.ones(toy["xs"].shape)
    phi_all = feature_matrix([WORD, OTHER], toy["xs"], ones)
    log_p = ebm.log_score(tb.logprob(toy["a"], toy["xs"]), phi_all)
    p = jax.nn.softmax(log_p)
    assert abs(float(p @ phi_all[:, 1]) - 0.5) < 0.02
    assert float(p @ phi_all[:, 0]) == pytest.approx(1.0)


def test_qrs_acceptance_equals_z_beta_over_beta(toy):
    ebm = make_ebm([Constraint(WORD)])
    q = toy["pi"]
    log_q_all = tb.logprob(q, toy["xs"])
    log_p_all = ebm.log_score(tb.logprob(toy["a"], toy["xs"]), toy["phi_all"])
    for log_beta in (-1.0, 0.5):
        beta = np.exp(log_beta)
        z_beta = float(jnp.sum(jnp.minimum(beta * jnp.exp(log_q_all), jnp.exp(log_p_all))))
        x, log_q = tb.sample(q, jax.random.key(5), 100_000)
        phi = feature_matrix([WORD], x, jnp.ones(x.shape))
        log_p = ebm.log_score(tb.logprob(toy["a"], x), phi)
        acc = qrs_accept(jax.random.key(6), log_p, log_q, log_beta)
        assert abs(float(acc.mean()) - z_beta / beta) < 0.006
        assert abs(float(qrs_acceptance_rate(log_p, log_q, log_beta)) - z_beta / beta) < 0.006
