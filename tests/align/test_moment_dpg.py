"""DPG with a distributional (moment) target on the exact toy lands on E_p[phi] = mu_bar."""

import jax
import jax.numpy as jnp

from lm_jax.align import Constraint, feature_matrix, make_ebm, token_sequences_feature
from lm_jax.align import toy as tb
from lm_jax.align.moments import fit_ebm


def test_dpg_moment_target_on_toy():
    word = token_sequences_feature("12", [(1, 2)])
    cons = [Constraint(word, 0.5)]
    a = tb.init_table(jax.random.key(1))
    xs = tb.all_sequences()
    phi = feature_matrix([word], xs, jnp.ones(xs.shape))
    x, log_q = tb.sample(a, jax.random.key(5), 20000)
    ebm, _ = fit_ebm(make_ebm(cons), cons, feature_matrix([word], x, jnp.ones(x.shape)), log_q)
    log_a = tb.logprob(a, xs)
    log_p = ebm.log_score(log_a, phi)
    e_p = float(jnp.exp(log_p - jax.nn.logsumexp(log_p)) @ phi[:, 0])
    assert abs(e_p - 0.5) < 0.02  # SNIS lambda on 20k samples
    state, _ = tb.train(a, [word], ebm, "dpg", steps=300, batch=256, lr=0.03)
    log_pi = tb.logprob(state.params, xs)
    assert abs(float(jnp.exp(log_pi) @ phi[:, 0]) - e_p) < 0.01
    assert tb.exact(log_p, log_pi, log_a)["kl_p_pi"] < 0.01
