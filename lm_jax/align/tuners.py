"""Policy-gradient tuners as pure, jittable steps: DPG, KL-adaptive DPG, f-DPG, REINFORCE, KL-PG.

Every method is one surrogate loss -mean(stop_grad(c(x)) * log pi(x)) over a batch sampled from
q, whose gradient is the method's estimator:

  dpg / kl_dpg  c = P/(q Z) - pi/q      grad KL(p||pi) = -E_q[(P/q - Z pi/q) grad log pi] / Z
                (the -pi/q term is Korbak et al.'s baseline; q = pi on policy, q = a frozen
                proposal snapshot for kl_dpg, replaced by pi every K steps when
                KL^(p||pi) < KL^(p||q) (Khalifa et al. 2021))
  fdpg_<f>      c = (pi/q) (r - rbar),  r = -f'(pi Z / P) for D_f(pi||p) = E_p f(pi/p)
                (Go et al. 2023): fkl KL(p||pi), rkl KL(pi||p), tv, js, chi2 = chi^2(p||pi);
                log(pi Z / P) is clipped to +-log_ratio_clip (rkl is infinite where P = 0)
  reinforce     c = R (- mean R with reinforce_baseline),  R = sum phi        (on policy)
  kl_pg         c = R' - mean R',  R' = R - beta (log pi - log a); beta adapted towards
                kl_target (Ziegler et al. 2019)                                (on policy)

P, Z from the EBM in log space; Z is the running importance-sampling estimate (`ZState`).
Batches with Z^ = 0 (no sample with P > 0) and non-finite gradients leave the parameters
unchanged to the bit and are counted in `skipped`.

`logprob_fn(params, frozen, tokens, mask) -> [B]` is the policy's sequence log-probability: for
a LoRA policy `params` are the adapters and `frozen` the backbone (lm_jax.align.policies).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lm_jax.align import estimators as est
from lm_jax.align.ebm import EBM
from lm_jax.configs.base import ConfigError

DIVERGENCES = ("fkl", "rkl", "tv", "js", "chi2")
METHODS = ("dpg", "kl_dpg", *(f"fdpg_{d}" for d in DIVERGENCES), "reinforce", "kl_pg")

LogprobFn = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TunerConfig:
    method: str = "dpg"
    baseline: bool = True  # dpg/kl_dpg: subtract Z pi/q (Korbak et al. 2022)
    reinforce_baseline: bool = False  # reinforce: subtract the batch-mean reward
    kl_adaptive_every: int = 10  # kl_dpg: K, steps between proposal checks
    log_ratio_clip: float = 10.0  # f-DPG: |log(pi Z / P)| bound
    kl_target: float = 6.0  # kl_pg: target KL(pi||a) in nats
    kl_beta: float = 0.1  # kl_pg: initial beta
    kl_horizon_rate: float = 0.1  # kl_pg: K_beta, beta *= 1 + K_beta clip(KL/target - 1, +-0.2)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {list(METHODS)}.")
        if self.kl_adaptive_every < 1:
            raise ConfigError("kl_adaptive_every must be >= 1.")
        if self.log_ratio_clip <= 0 or self.kl_target <= 0 or self.kl_beta < 0:
            raise ConfigError("log_ratio_clip and kl_target must be > 0, kl_beta >= 0.")

    @property
    def off_policy(self) -> bool:
        """Samples come from `state.proposal` (kl_dpg) instead of the live policy."""
        return self.method == "kl_dpg"

    @property
    def uses_z(self) -> bool:
        return self.method in ("dpg", "kl_dpg") or self.method.startswith("fdpg_")


@flax.struct.dataclass
class AlignState:
    step: jax.Array
    params: Any  # the live policy (LoRA adapters, or full parameters)
    opt_state: Any
    proposal: Any  # kl_dpg: frozen snapshot sampled from; None otherwise
    z: est.ZState  # running log Z^
    beta: jax.Array  # kl_pg coefficient
    window: jax.Array  # [3] kl_dpg: sum KL^(p||pi), sum KL^(p||q), steps in window
    proposal_updates: jax.Array
    skipped: jax.Array


def init_state(
    params, tx: optax.GradientTransformation, cfg: TunerConfig, log_z=None, z_count=0.0
) -> AlignState:
    """Fresh state; `log_z` seeds the running Z^ (e.g. from the moment-matching samples)."""
    return AlignState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        proposal=jax.tree.map(jnp.copy, params) if cfg.off_policy else None,
        z=est.ZState.create(log_z, z_count),
        beta=jnp.asarray(cfg.kl_beta, jnp.float32),
        window=jnp.zeros(3, jnp.float32),
        proposal_updates=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def f_prime(div: str, log_t: jax.Array) -> jax.Array:
    """f'(t) at t = pi/p, given log t, for D_f(pi||p) = E_p[f(pi/p)]."""
    if div == "fkl":  # f = -log t: KL(p||pi)
        return -jnp.exp(-log_t)
    if div == "rkl":  # f = t log t: KL(pi||p)
        return log_t + 1.0
    if div == "tv":  # f = |t - 1| / 2
        return 0.5 * jnp.sign(log_t)
    if div == "js":  # f = (t log(2t/(1+t)) + log(2/(1+t))) / 2: f' = log(2t/(1+t)) / 2
        return 0.5 * (jnp.log(2.0) - jax.nn.softplus(-log_t))
    if div == "chi2":  # f = (1 - t)^2 / t: chi^2(p||pi) = sum (p - pi)^2 / pi
        return 1.0 - jnp.exp(-2.0 * log_t)
    raise ConfigError(f"unknown divergence {div!r}; choose one of {DIVERGENCES}.")


def coefficients(cfg: TunerConfig, log_pi, log_q, log_p, log_z, log_a, reward, beta):
    """Per-sample c(x) of the surrogate -mean(c log pi) (no gradient flows through c)."""
    m = cfg.method
    if m in ("dpg", "kl_dpg"):
        c = jnp.exp(est.log_weights(log_p, log_q) - log_z)  # P / (q Z)
        return c - jnp.exp(log_pi - log_q) if cfg.baseline else c
    if m.startswith("fdpg_"):
        clip = cfg.log_ratio_clip
        log_t = jnp.clip(log_pi + log_z - jnp.where(jnp.isneginf(log_p), -1e30, log_p), -clip, clip)
        r = -f_prime(m[5:], log_t)
        rho = jnp.exp(log_pi - log_q)  # 1 on policy
        rbar = jnp.sum(rho * r) / jnp.sum(rho)
        return rho * (r - rbar)
    if m == "reinforce":
        return reward - jnp.mean(reward) if cfg.reinforce_baseline else reward
    if m == "kl_pg":
        r = reward - beta * (log_pi - log_a)
        return r - jnp.mean(r)
    raise ConfigError(f"unknown method {m!r}")


def align_step(
    state: AlignState,
    batch: dict,  # tokens [B,T], mask [B,T], log_q [B], log_a [B], phi [B,F]
    frozen: Any,
    ebm: EBM,
    *,
    cfg: TunerConfig,
    tx: optax.GradientTransformation,
    logprob_fn: LogprobFn,
) -> tuple[AlignState, dict]:
    """One update of the policy; pure (jit it with `jit_align_step`)."""
    log_q, log_a, phi = batch["log_q"], batch["log_a"], batch["phi"]
    log_p = ebm.log_score(log_a, phi)  # [B]
    log_w = est.log_weights(log_p, log_q)
    z = state.z.update(log_w) if cfg.uses_z else state.z
    batch_ok = jnp.isfinite(jax.nn.logsumexp(log_w)) if cfg.uses_z else jnp.array(True)
    log_z = jnp.where(jnp.isfinite(z.log_z), z.log_z, 0.0)
    reward = jnp.sum(phi, axis=-1)

    def loss_fn(params):
        log_pi = logprob_fn(params, frozen, batch["tokens"], batch["mask"])
        lp = jax.lax.stop_gradient(log_pi)
        c = coefficients(cfg, lp, log_q, log_p, log_z, log_a, reward, state.beta)
        return -jnp.mean(jax.lax.stop_gradient(c) * log_pi), lp

    (loss, log_pi), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    ok = batch_ok & jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    params, opt_state = keep(new_params, state.params), keep(opt_state, state.opt_state)

    m = est.alignment_metrics(log_p, log_q, log_pi, log_a, phi, on_policy=not cfg.off_policy)
    m["log_z_running"] = z.log_z
    proposal, window, n_updates = state.proposal, state.window, state.proposal_updates
    if cfg.off_policy:  # KL-adaptive proposal (on the same samples from q)
        kl_q = est.kl_p_pi(log_p, log_q, log_q)
        m["kl_p_q"] = kl_q
        window = window + jnp.where(ok, jnp.stack([m["kl_p_pi"], kl_q, 1.0]), 0.0)
        check = (state.step + 1) % cfg.kl_adaptive_every == 0
        better = check & (window[2] > 0) & (window[0] < window[1])
        proposal = jax.tree.map(lambda p, q: jnp.where(better, p, q), params, proposal)
        n_updates = n_updates + better.astype(jnp.int32)
        window = jnp.where(check, jnp.zeros_like(window), window)
    beta = state.beta
    if cfg.method == "kl_pg":
        err = jnp.clip(m["kl_pi_a"] / cfg.kl_target - 1.0, -0.2, 0.2)
        beta = beta * (1.0 + cfg.kl_horizon_rate * err)
        m["beta"] = beta
    new = AlignState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        proposal=proposal,
        z=z,
        beta=beta,
        window=window,
        proposal_updates=n_updates,
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    m.update(loss=loss, grad_norm=grad_norm, skipped=new.skipped, z_skipped=z.skipped)
    m["proposal_updates"] = n_updates
    return new, m


def make_step(cfg: TunerConfig, tx: optax.GradientTransformation, logprob_fn: LogprobFn):
    """The pure step with config, optimizer and policy bound: step(state, batch, frozen, ebm)."""
    return functools.partial(align_step, cfg=cfg, tx=tx, logprob_fn=logprob_fn)


def jit_align_step(cfg, tx, logprob_fn, mesh=None, state_sharding=None, frozen_sharding=None):
    """jit(step). With a mesh the state (and frozen weights) default to replicated and the batch
    keeps the sharding it was placed with (see `lm_jax.align.samplers.shard_batch`): sampling and
    gradients are data-parallel and every mean in the estimators is a cross-device reduction."""
    fn = make_step(cfg, tx, logprob_fn)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    st = rep if state_sharding is None else state_sharding
    return jax.jit(
        fn,
        in_shardings=(st, None, rep if frozen_sharding is None else frozen_sharding, rep),
        out_shardings=(st, rep),
        donate_argnums=(0,),
    )
