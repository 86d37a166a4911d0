"""KL(p||pi) and TVD(p, pi) on base samples (q = a) for the host loop's evaluations."""

import jax.numpy as jnp
import numpy as np

from lm_jax.align import Constraint, make_ebm, token_sequences_feature
from lm_jax.align.loop import reference_metrics


def test_reference_metrics_pointwise():
    rng = np.random.default_rng(0)
    log_a = rng.normal(-20.0, 3.0, 400).astype(np.float32)
    phi = (rng.random(400) < 0.2).astype(np.float32)[:, None]
    ebm = make_ebm([Constraint(token_sequences_feature("x", [(1,)]))])
    ref = {"log_a": log_a, "phi": jnp.asarray(phi)}
    log_z = np.log(phi.mean())
    m = reference_metrics(ebm, ref, jnp.asarray(log_a))  # pi = a: KL(p||a) = -log Z^
    np.testing.assert_allclose(m["eval/kl_p_pi"], -log_z, rtol=1e-5)
    np.testing.assert_allclose(m["eval/tvd_p_pi"], 1.0 - phi.mean(), rtol=1e-5)
    log_pi = np.where(phi[:, 0] > 0, log_a - log_z, -1e9)  # pi = p on the sample
    m = reference_metrics(ebm, ref, jnp.asarray(log_pi))
    assert abs(m["eval/kl_p_pi"]) < 1e-4 and abs(m["eval/tvd_p_pi"]) < 1e-4
