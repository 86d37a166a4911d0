"""Importance-sampling estimators for distributional alignment, all in log space.

Samples x_i ~ q with log q(x_i), the EBM score log P(x_i) and the policy's log pi(x_i):
w = P/q, r = pi/q.

    Z^          = mean w                                   (log Z^ = logsumexp(log w) - log N)
    KL(p||pi)^  = mean(w (log P - log pi)) / Z^ - log Z^
    TVD(p,pi)^  = 0.5 mean |r - w / Z^|
    KL(pi||a)^  = mean(r (log pi - log a)) / mean(r)       (= mean(log pi - log a) on policy)
    E_pi[phi]^  = mean(r phi) / mean(r)

Everything is a plain jnp reduction: inside `jax.jit` over batch-sharded inputs XLA reduces
across devices. A batch where every P(x) = 0 has Z^ = 0: `valid` is False, KL^ is +inf and TVD^
is 1 (never NaN); training steps skip such batches and count them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def _n(x: jax.Array) -> jax.Array:
    return jnp.asarray(x.shape[0], jnp.float32)


def log_mean_exp(x: jax.Array) -> jax.Array:
    """log mean exp(x) over the leading axis; -inf when every entry is -inf."""
    return jax.nn.logsumexp(x, axis=0) - jnp.log(_n(x))


def log_weights(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """log w = log P - log q; -inf (not NaN) where P = 0."""
    return jnp.where(jnp.isneginf(log_p), -jnp.inf, log_p - log_q)


def log_z_hat(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """log Z^ = log mean(P/q)."""
    return log_mean_exp(log_weights(log_p, log_q))


def _normalised(log_w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(w / sum w, valid) with zeros (not NaN) when every weight is 0."""
    m = jax.nn.logsumexp(log_w)
    valid = jnp.isfinite(m)
    wn = jnp.where(valid, jnp.exp(log_w - jnp.where(valid, m, 0.0)), 0.0)
    return wn, valid


def kl_p_pi(log_p: jax.Array, log_q: jax.Array, log_pi: jax.Array) -> jax.Array:
    """KL(p || pi)^ = sum_i wn_i (log P_i - log pi_i) - log Z^ (wn = self-normalised w)."""
    log_w = log_weights(log_p, log_q)
    wn, valid = _normalised(log_w)
    terms = jnp.where(wn > 0, wn * (log_p - log_pi), 0.0)
    val = jnp.sum(terms) - log_mean_exp(log_w)
    return jnp.where(valid, val, jnp.inf)


def tvd_p_pi(log_p: jax.Array, log_q: jax.Array, log_pi: jax.Array) -> jax.Array:
    """TVD(p, pi)^ = 0.5 mean |pi/q - w / Z^|."""
    log_w = log_weights(log_p, log_q)
    log_z = log_mean_exp(log_w)
    valid = jnp.isfinite(log_z)
    p_over_q = jnp.where(valid, jnp.exp(log_w - jnp.where(valid, log_z, 0.0)), 0.0)
    val = 0.5 * jnp.mean(jnp.abs(jnp.exp(log_pi - log_q) - p_over_q))
    return jnp.where(valid, val, 1.0)


def _ratio_weights(log_pi: jax.Array, log_q: jax.Array | None) -> jax.Array:
    if log_q is None:
        return jnp.full(log_pi.shape, 1.0 / log_pi.shape[0], jnp.float32)
    return jax.nn.softmax(log_pi - log_q)


def kl_pi_a(log_pi: jax.Array, log_a: jax.Array, log_q: jax.Array | None = None) -> jax.Array:
    """KL(pi || a)^ from samples of pi (log_q=None) or of q (self-normalised r = pi/q)."""
    return jnp.sum(_ratio_weights(log_pi, log_q) * (log_pi - log_a))


def expectation(
    phi: jax.Array, log_pi: jax.Array | None = None, log_q: jax.Array | None = None
) -> jax.Array:
    """E_pi[phi]^ ([N] or [N, F]) from samples of pi, or of q with weights pi/q."""
    if log_pi is None:
        return jnp.mean(phi, axis=0)
    w = _ratio_weights(log_pi, log_q)
    return jnp.tensordot(w, phi, axes=(0, 0))


def kl_p_a(lam_dot_mu: jax.Array | float, log_z: jax.Array) -> jax.Array:
    """KL(p || a) = lambda . mu_bar - log Z (= -log Z for pointwise constraints only): the
    Pythagorean floor: every pi meeting the constraints has KL(pi || a) >= KL(p || a)."""
    return jnp.asarray(lam_dot_mu, jnp.float32) - log_z


def alignment_metrics(log_p, log_q, log_pi, log_a, phi, on_policy: bool) -> dict:
    """All estimators on one batch sampled from q (q = pi when `on_policy`)."""
    lq = None if on_policy else log_q
    log_z = log_z_hat(log_p, log_q)
    return {
        "log_z": log_z,
        "z_valid": jnp.isfinite(log_z),
        "kl_p_pi": kl_p_pi(log_p, log_q, log_pi),
        "tvd_p_pi": tvd_p_pi(log_p, log_q, log_pi),
        "kl_pi_a": kl_pi_a(log_pi, log_a, lq),
        "phi_pi": expectation(phi, None if on_policy else log_pi, lq),
    }


@flax.struct.dataclass
class ZState:
    """Running log Z^ over every sample seen: log sum w and the sample count (a batch with Z^ = 0
    adds its samples but no mass, which keeps Z^ unbiased); `skipped` counts such batches."""

    log_sum: jax.Array
    count: jax.Array
    skipped: jax.Array

    @classmethod
    def create(cls, log_z: float | None = None, count: float = 0.0) -> ZState:
        """Empty, or seeded with a prior estimate log_z over `count` samples."""
        log_sum = -jnp.inf if log_z is None else log_z + jnp.log(jnp.float32(max(count, 1.0)))
        return cls(
            log_sum=jnp.asarray(log_sum, jnp.float32),
            count=jnp.asarray(count if log_z is None else max(count, 1.0), jnp.float32),
            skipped=jnp.zeros((), jnp.int32),
        )

    @property
    def log_z(self) -> jax.Array:
        """Running log Z^ (-inf until some sample had P > 0)."""
        return self.log_sum - jnp.log(jnp.maximum(self.count, 1.0))

    def update(self, log_w: jax.Array) -> ZState:
        batch = jax.nn.logsumexp(log_w)
        valid = jnp.isfinite(batch)
        return ZState(
            log_sum=jnp.logaddexp(self.log_sum, batch),
            count=self.count + _n(log_w),
            skipped=self.skipped + (~valid).astype(jnp.int32),
        )
