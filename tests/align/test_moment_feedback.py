"""Moment feedback (dual ascent of lambda on the policy's moment): closed forms and the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm_jax.align import Constraint, TunerConfig, make_ebm, token_sequences_feature
from lm_jax.align.loop import estimate_target, train
from lm_jax.align.moments import MomentError, check_moment_feedback, dual_ascent, log_z_on_base
from lm_jax.align.policies import make_lm_policy
from lm_jax.align.samplers import SamplerConfig
from lm_jax.configs import llama_style
from lm_jax.configs.lora import LoraConfig
from lm_jax.nn import Transformer

WORD = token_sequences_feature("tok5", [(5,)])
OTHER = token_sequences_feature("tok7", [(7,)])


def test_dual_ascent_moves_only_distributional_lambdas():
    cons = [Constraint(OTHER), Constraint(WORD, 0.5)]  # pointwise, then moment 0.5
    ebm = make_ebm(cons, [0.0, 1.0])
    out = dual_ascent(ebm, cons, [0.9, 0.3], rate=0.5)
    np.testing.assert_allclose(out.lam, [0.0, 1.0 + 0.5 * (0.5 - 0.3)], rtol=1e-6)
    assert dual_ascent(ebm, cons, [0.9, 0.3], rate=0.0) is ebm
    assert dual_ascent(ebm, cons[:1], [0.9], rate=0.5) is ebm  # nothing distributional


def test_feedback_misuse_is_a_clear_error():
    moment, point = [Constraint(WORD, 0.5)], [Constraint(WORD)]
    check_moment_feedback(0.0, point, TunerConfig("reinforce"))  # off: anything goes
    check_moment_feedback(0.02, moment, TunerConfig("fdpg_js"))
    with pytest.raises(MomentError, match=">= 0"):
        check_moment_feedback(-0.1, moment, TunerConfig("dpg"))
    with pytest.raises(MomentError, match="pointwise"):
        check_moment_feedback(0.1, point, TunerConfig("dpg"))
    with pytest.raises(MomentError, match="reinforce ignores"):
        check_moment_feedback(0.1, moment, TunerConfig("reinforce"))


def test_log_z_on_base_closed_form():
    # q = a, one binary feature with empirical rate m: Z^ = (1 - m) + m exp(lambda)
    cons = [Constraint(WORD, 0.5)]
    phi = jnp.asarray([[1.0], [0.0], [0.0], [1.0], [0.0]])
    log_a = jnp.asarray([-3.0, -1.0, -2.0, -5.0, -4.0])
    lam = 1.7
    got = log_z_on_base(make_ebm(cons, [lam]), phi, log_a)
    np.testing.assert_allclose(got, np.log(0.6 + 0.4 * np.exp(lam)), rtol=1e-6)


def _policy():
    cfg = llama_style(vocab_size=16, d_model=32, num_layers=2, num_heads=2, max_len=64)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    scfg = SamplerConfig(max_new_tokens=12, stop_tokens=(1,), prompt=(2,))
    return make_lm_policy(cfg, params, scfg, lora=LoraConfig(rank=2, alpha=4.0))


def test_loop_applies_feedback_each_step_and_renormalises():
    policy, adapters, frozen = _policy()
    cons = [Constraint(WORD, 0.5)]
    ebm, info, ref = estimate_target(
        policy, frozen, cons, jax.random.key(2), 256, 64, return_samples=True
    )
    rate = 2.0

    def run(steps, **kw):
        tx = optax.adam(1e-2)
        kw.update(batch_size=64, key=jax.random.key(3), target=(ebm, info), log=lambda _: None)
        return train(policy, adapters, frozen, cons, TunerConfig("dpg"), tx, steps=steps, **kw)

    _, hist = run(4, reference=ref, moment_feedback=rate)
    lam = [float(ebm.lam[0])] + [h["lambda"][0] for h in hist[:-1]]
    for i, h in enumerate(hist[:-1]):
        np.testing.assert_allclose(lam[i + 1] - lam[i], rate * (0.5 - h["phi_pi"][0]), atol=1e-5)
        want = log_z_on_base(make_ebm(cons, [lam[i + 1]]), ref["phi"], ref["log_a"])
        np.testing.assert_allclose(h["log_z_target"], want, rtol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        run(1, moment_feedback=rate)
