"""DPO and GRPO on the exact toy (lm_jax/align/toy_baselines.py): per-token log-probs sum to
the sequence log-prob, both methods satisfy the constraint from a base that rarely does, and
GRPO's KL term keeps the policy nearer the base than GRPO without it (exact metrics)."""

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.align import feature_matrix, token_sequences_feature
from lm_jax.align import toy as tb
from lm_jax.align.toy_baselines import token_logprobs, train_dpo, train_grpo

WORD = token_sequences_feature("12", [(1, 2)])
A = tb.init_table(jax.random.key(1))
XS = tb.all_sequences()
PHI = feature_matrix([WORD], XS, jnp.ones(XS.shape))[:, 0]


def exact_phi_and_kl(table):
    lp, la = tb.logprob(table, XS), tb.logprob(A, XS)
    pi = jnp.exp(lp)
    return float(pi @ PHI), float(pi @ (lp - la))


def test_token_logprobs_sum_to_the_sequence_logprob():
    x, _ = tb.sample(A, jax.random.key(0), 64)
    np.testing.assert_allclose(token_logprobs(A, x).sum(1), tb.logprob(A, x), atol=1e-5)


def test_dpo_and_grpo_reach_the_constraint_and_the_kl_term_holds_grpo_near_the_base():
    base_phi, _ = exact_phi_and_kl(A)
    assert base_phi < 0.2
    dpo_phi, _ = exact_phi_and_kl(train_dpo(A, [WORD], steps=120, beta=1.0)[0])
    kl_phi, kl_kl = exact_phi_and_kl(train_grpo(A, [WORD], steps=120, beta=0.04)[0])
    free_phi, free_kl = exact_phi_and_kl(train_grpo(A, [WORD], steps=120, beta=0.0)[0])
    assert min(dpo_phi, kl_phi, free_phi) > 0.9, (dpo_phi, kl_phi, free_phi)
    assert kl_kl < free_kl - 0.3, (kl_kl, free_kl)
