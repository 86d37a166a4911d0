"""Moment matching: lambda such that E_p[phi] = mu_bar, by self-normalised importance sampling.

With N proposal samples x_i ~ q and log u_i = log a(x_i) + log b(x_i) - log q(x_i), the
weights w_i(lambda) = u_i exp(lambda . phi_i) give the SNIS moment E_w[phi]. lambda maximises
the concave dual

    g(lambda) = lambda . mu_bar - log mean_i w_i(lambda),
    grad g = mu_bar - E_w[phi],      hess g = -Cov_w[phi],

solved by damped Newton (ridge + the largest of a few step sizes that does not lower g) or gradient
ascent, in one jitted `lax.while_loop` with a tolerance and an iteration cap. For one binary
feature and q = a the solution is logit(mu_bar) - logit(mu_a^).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.align import estimators as est
from lm_jax.align.features import Constraint
from lm_jax.configs.base import ConfigError

STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0)


class MomentError(ConfigError):
    """Moment targets that the samples cannot reach, or out-of-range boolean targets."""


def check_targets(constraints: Sequence[Constraint]) -> None:
    """Boolean moment targets must lie strictly inside (0, 1); raise before any sampling."""
    for c in constraints:
        if c.pointwise:
            continue
        t = c.target
        if not np.isfinite(t):
            raise MomentError(f"moment target for {c.feature.name} is {t}: give a finite number.")
        if c.feature.binary and not 0.0 < t < 1.0:
            raise MomentError(
                f"moment target {c.feature.name}={t} is outside (0, 1): a boolean feature's "
                "expectation is a probability. Use a value strictly between 0 and 1, or drop "
                f"the '={t}' to make it a pointwise constraint (phi(x) = 1 for every sample)."
            )


def check_support(constraints: Sequence[Constraint], phi, log_u, what="proposal") -> None:
    """Host-side: every pointwise constraint holds on some sample, and every moment target lies
    strictly between the feature's smallest and largest value on supported samples (else lambda
    diverges). phi [N, F], log_u [N] (log a + log b - log q, -inf off the support)."""
    phi = np.asarray(phi, np.float64)
    log_u = np.asarray(log_u, np.float64)
    n = phi.shape[0]
    advice = (
        "Draw more samples (--moment_samples), use a prompt that makes it likelier, or start "
        "from a proposal closer to the target."
    )
    for i, c in enumerate(constraints):
        if c.pointwise and not np.any(phi[:, i] > 0):
            raise MomentError(
                f"constraint {c.feature.name} never fires in {n} {what} samples, so Z^ = 0 and "
                f"the target distribution cannot be estimated. {advice}"
            )
    support = np.isfinite(log_u)
    if not np.any(support):
        raise MomentError(
            f"no {what} sample satisfies all pointwise constraints together ({n} samples). "
            + advice
        )
    for i, c in enumerate(constraints):
        if c.pointwise:
            continue
        vals = phi[support, i]
        lo, hi = float(vals.min()), float(vals.max())
        if not lo < c.target < hi:
            never = "never fires" if hi <= 0 else f"only takes values in [{lo:g}, {hi:g}]"
            raise MomentError(
                f"feature {c.feature.name} {never} in {int(support.sum())} supported {what} "
                f"samples, so the target {c.target} cannot be matched by importance weights "
                f"(lambda would diverge). {advice}"
            )


def _dual(lam, phi, log_u, mu_bar):
    return lam @ mu_bar - (jax.nn.logsumexp(log_u + phi @ lam) - jnp.log(phi.shape[0]))


@functools.partial(jax.jit, static_argnames=("method", "max_iter"))
def _solve(phi, log_u, mu_bar, lam0, tol, ridge, lr, method: str, max_iter: int):
    F = phi.shape[1]
    steps = jnp.asarray(STEP_SIZES, jnp.float32)

    def moments(lam):
        wn = jax.nn.softmax(log_u + phi @ lam)  # [N]
        mean = wn @ phi  # [F]
        return wn, mean

    def body(carry):
        lam, it, _ = carry
        wn, mean = moments(lam)
        grad = mu_bar - mean
        if method == "newton":
            centred = phi - mean
            cov = (centred * wn[:, None]).T @ centred  # [F, F]
            direction = jnp.linalg.solve(cov + ridge * jnp.eye(F), grad)
        else:
            direction = lr * grad
        cands = lam[None, :] + steps[:, None] * direction[None, :]  # [S, F]
        vals = jax.vmap(lambda c: _dual(c, phi, log_u, mu_bar))(cands)
        # the largest step that does not lower g beyond float32 round-off (step 0 always does)
        slack = 1e-6 * (1.0 + jnp.abs(vals[-1]))
        ok = jnp.isfinite(vals) & (vals >= vals[-1] - slack)
        lam = cands[jnp.argmax(ok)]
        _, mean = moments(lam)
        return lam, it + 1, jnp.max(jnp.abs(mu_bar - mean))

    def cond(carry):
        _, it, err = carry
        return (it < max_iter) & (err > tol)

    _, mean0 = moments(lam0)
    init = (lam0, jnp.zeros((), jnp.int32), jnp.max(jnp.abs(mu_bar - mean0)))
    return jax.lax.while_loop(cond, body, init)


def fit_lambda(
    phi,  # [N, F] distributional features on proposal samples
    mu_bar,  # [F] targets
    log_u=None,  # [N] log a + log b - log q (None: q = a and no pointwise constraint)
    *,
    method: str = "newton",
    tol: float = 1e-5,
    max_iter: int = 100,
    ridge: float = 1e-6,
    lr: float = 1.0,
    lam0=None,
    strict: bool = True,
) -> tuple[jax.Array, dict]:
    """lambda [F] with |E_w[phi] - mu_bar|_inf <= tol; info has iterations, error, converged.

    Raises MomentError (strict) if the iteration cap is hit before the tolerance."""
    if method not in ("newton", "gradient"):
        raise MomentError(f"method must be 'newton' or 'gradient', got {method!r}.")
    phi = jnp.asarray(phi, jnp.float32)
    mu_bar = jnp.asarray(mu_bar, jnp.float32).reshape(-1)
    if phi.ndim != 2 or phi.shape[1] != mu_bar.shape[0]:
        raise MomentError(f"phi must be [N, {mu_bar.shape[0]}], got {phi.shape}.")
    if phi.shape[1] == 0:
        return jnp.zeros((0,), jnp.float32), {"iterations": 0, "error": 0.0, "converged": True}
    log_u = jnp.zeros(phi.shape[:1], jnp.float32) if log_u is None else jnp.asarray(log_u)
    lam0 = jnp.zeros(phi.shape[1], jnp.float32) if lam0 is None else jnp.asarray(lam0)
    lam, it, err = _solve(phi, log_u, mu_bar, lam0, tol, ridge, lr, method, max_iter)
    info = {"iterations": int(it), "error": float(err), "converged": bool(err <= tol)}
    if not np.all(np.isfinite(np.asarray(lam))):
        raise MomentError(f"moment matching diverged (lambda = {np.asarray(lam)}).")
    if strict and not info["converged"]:
        raise MomentError(
            f"moment matching stopped after {info['iterations']} iterations with moment error "
            f"{info['error']:.3g} > tol {tol}: raise max_iter, loosen tol, or draw more samples."
        )
    return lam, info


def fit_ebm(ebm, constraints: Sequence[Constraint], phi, log_a, log_q=None, **kw):
    """Check targets and support, fit lambda on the distributional features, return (ebm, info).

    phi [N, F] over all constraints; log_a, log_q [N] (log_q=None: samples from a)."""
    check_targets(constraints)
    log_u = ebm.log_b(jnp.asarray(phi)) + (
        0.0 if log_q is None else jnp.asarray(log_a) - jnp.asarray(log_q)
    )
    check_support(constraints, phi, log_u)
    idx = [i for i, c in enumerate(constraints) if not c.pointwise]
    mu_bar = [constraints[i].target for i in idx]
    lam_d, info = fit_lambda(jnp.asarray(phi)[:, idx], mu_bar, log_u, **kw)
    lam = jnp.zeros(len(constraints), jnp.float32).at[jnp.asarray(idx, jnp.int32)].set(lam_d)
    return ebm.replace_lam(lam), info


def check_moment_feedback(rate: float, constraints: Sequence[Constraint], tuner) -> None:
    """Moment feedback needs a rate >= 0, a moment target to act on and a tuner that targets the
    EBM (dpg, kl_dpg, fdpg_*): raise MomentError naming the fix otherwise."""
    if rate < 0:
        raise MomentError(f"moment_feedback must be >= 0 (0 = off), got {rate}.")
    if not rate:
        return
    if all(c.pointwise for c in constraints):
        raise MomentError(
            "moment_feedback adapts the lambda of moment targets, but every constraint is "
            "pointwise: add a target such as word:she=0.5, or drop --align.moment_feedback."
        )
    if not tuner.uses_z:
        raise MomentError(
            f"moment_feedback moves the EBM's lambda, which {tuner.method} ignores: use dpg, "
            "kl_dpg or an fdpg_* method, or drop --align.moment_feedback."
        )


def dual_ascent(ebm, constraints: Sequence[Constraint], policy_moment, rate: float):
    """One step of moment feedback on the policy: lambda_d += rate (mu_bar_d - E_pi[phi_d]).

    GDC fixes lambda so that the target p meets mu_bar; a policy class that cannot reach p exactly
    (a low-rank adapter) converges to a near-projection whose moment can sit off mu_bar. Adapting
    lambda on the policy's own moment (stochastic dual ascent on the constraint E_pi[phi] = mu_bar)
    moves the target until the policy meets it, at the price of a target that is no longer the
    I-projection of a. policy_moment [F] over all constraints; pointwise entries are ignored."""
    idx = [i for i, c in enumerate(constraints) if not c.pointwise]
    if not idx or rate == 0.0:
        return ebm
    mu_bar = jnp.asarray([constraints[i].target for i in idx], jnp.float32)
    ii = jnp.asarray(idx, jnp.int32)
    moment = jnp.asarray(policy_moment, jnp.float32)[ii]
    return ebm.replace_lam(ebm.lam.at[ii].add(rate * (mu_bar - moment)))


def log_z_on_base(ebm, phi, log_a) -> float:
    """log Z^ of the EBM on samples of the base model a (w = P / a = b exp(lambda . phi)): the
    normaliser to use after lambda changed. phi [N, F], log_a [N]."""
    log_a = jnp.asarray(log_a, jnp.float32)
    return float(est.log_z_hat(ebm.log_score(log_a, jnp.asarray(phi, jnp.float32)), log_a))
