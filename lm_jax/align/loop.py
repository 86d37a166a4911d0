"""The host loop: estimate the target (lambda, Z) on base samples, then sample -> score -> step
with any tuner, logging alignment metrics and diversity (Distinct-n, Self-BLEU)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax

from lm_jax.align import estimators as est
from lm_jax.align.ebm import EBM, make_ebm
from lm_jax.align.features import Constraint, feature_matrix
from lm_jax.align.moments import (
    check_moment_feedback,
    check_targets,
    dual_ascent,
    fit_ebm,
    log_z_on_base,
)
from lm_jax.align.policies import LMPolicy
from lm_jax.align.samplers import Samples, shard_batch
from lm_jax.align.tuners import TunerConfig, init_state, jit_align_step
from lm_jax.configs.train import TrainConfig
from lm_jax.convert.sources import load_any
from lm_jax.eval.generation_metrics import distinct_n, self_bleu
from lm_jax.train import engine
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash


def scorer(policy: LMPolicy, constraints: Sequence[Constraint]):
    """jit(frozen, tokens, mask) -> (log a [B], phi [B, F])."""
    feats = [c.feature for c in constraints]
    return jax.jit(
        lambda frozen, t, m: (policy.base_logprob(frozen, t, m), feature_matrix(feats, t, m))
    )


def sample_many(sample_fn: Callable[[jax.Array, int], Samples], key, n: int, batch: int):
    outs = [sample_fn(jax.random.fold_in(key, i), batch) for i in range(-(-n // batch))]
    return jax.tree.map(lambda *x: np.concatenate(x)[:n], *outs)


def estimate_target(
    policy, frozen, constraints, key, n: int, batch: int, score=None, return_samples=False
):
    """(EBM with fitted lambda, info): SNIS moment matching and log Z^ on n samples of a.
    With `return_samples`, also the base samples as a `reference` for `train` (dict of
    tokens, mask, log_a, phi)."""
    check_targets(constraints)
    score = scorer(policy, constraints) if score is None else score
    s = sample_many(lambda k, b: policy.sample_base(frozen, k, b), key, n, batch)
    log_a, phi = score(frozen, s.tokens, s.mask)
    ebm, fit = fit_ebm(make_ebm(constraints), constraints, phi, log_a)
    log_z = log_z_on_base(ebm, phi, log_a)
    idx = [i for i, c in enumerate(constraints) if not c.pointwise]
    lam_mu = float(sum(float(ebm.lam[i]) * constraints[i].target for i in idx))
    info = {
        "log_z": log_z,
        "kl_p_a": lam_mu - log_z,  # the Pythagorean floor for KL(pi || a)
        "phi_a": np.asarray(phi.mean(0)).tolist(),
        "lambda": np.asarray(ebm.lam).tolist(),
        "fit_iterations": fit["iterations"],
        "samples": n,
    }
    if return_samples:
        ref = {"tokens": s.tokens, "mask": s.mask, "log_a": np.asarray(log_a), "phi": phi}
        return ebm, info, ref
    return ebm, info


def reference_metrics(ebm: EBM, ref: dict, log_pi) -> dict:
    """KL(p||pi)^ and TVD(p, pi)^ with the base samples as the proposal (q = a). Unlike the
    on-policy estimates, these stay meaningful when pi has collapsed onto part of p's support
    (for a pointwise constraint the base samples with phi = 1 are exact samples of p)."""
    log_a = np.asarray(ref["log_a"])
    log_p = ebm.log_score(log_a, ref["phi"])
    return {
        "eval/kl_p_pi": float(est.kl_p_pi(log_p, log_a, log_pi)),
        "eval/tvd_p_pi": float(est.tvd_p_pi(log_p, log_a, log_pi)),
    }


def diversity(texts: Sequence[str], self_bleu_n: int = 64) -> dict:
    """Distinct-1/2 over all texts and Self-BLEU on the first `self_bleu_n` (quadratic cost)."""
    out = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
    if len(texts) >= 2 and self_bleu_n >= 2:
        out["self_bleu"] = self_bleu(list(texts)[:self_bleu_n])
    return out


def decode_samples(tokenizer, s: Samples) -> list[str]:
    toks, mask = np.asarray(s.tokens), np.asarray(s.mask)
    eos = getattr(tokenizer, "eos_id", None)
    return [
        tokenizer.decode([int(t) for t, m in zip(r, mr) if m and t != eos])
        for r, mr in zip(toks, mask)
    ]


def evaluate_policy(policy: LMPolicy, trainable, frozen, score, key, n: int, batch: int, *,
                    ebm: EBM | None = None, reference: dict | None = None, tokenizer=None,
                    ref_logprob=None) -> dict:  # fmt: skip
    """The alignment metrics of policy `trainable` on `n` fresh samples (drawn `batch` at a
    time with `key`): eval/kl_pi_a (log pi - log a), eval/phi_pi (the features' means); with
    `ebm` and `reference` base samples, eval/kl_p_pi and eval/tvd_p_pi (`reference_metrics`);
    with `tokenizer`, Distinct-1/2 and Self-BLEU of the decoded samples. `score` is
    `scorer(policy, constraints)`; `ref_logprob` a jitted `policy.logprob_fn`."""
    s = sample_many(lambda k, b: policy.sample(trainable, frozen, k, b), key, n, batch)
    log_a, phi = score(frozen, s.tokens, s.mask)
    row = {"eval/kl_pi_a": float(est.kl_pi_a(s.log_q, log_a)),
           "eval/phi_pi": np.asarray(phi.mean(0)).tolist()}  # fmt: skip
    if reference is not None and ebm is not None:
        logprob = ref_logprob or jax.jit(policy.logprob_fn)
        m = len(reference["log_a"])
        log_pi = np.concatenate([
            np.asarray(logprob(trainable, frozen, reference["tokens"][j : j + batch],
                               reference["mask"][j : j + batch]))
            for j in range(0, m, batch)
        ])  # fmt: skip
        row.update(reference_metrics(ebm, reference, log_pi))
    if tokenizer is not None:
        texts = decode_samples(tokenizer, s)
        row.update({f"eval/{k}": v for k, v in diversity(texts).items()})
    return row


class AlignTask(Task):
    """Sample -> score (log a, phi) -> update, as a task of the one loop (`engine.run`).

    Update `i` samples with `fold_in(k_train, i)` and evaluation after `i` updates with
    `fold_in(k_eval, i)`, so a resumed run draws the same samples; the adapted lambda of
    `moment_feedback` is host state saved with every checkpoint.
    """

    metric_prefix = ""
    metrics_every_step = True

    def __init__(self, policy, trainable, frozen, constraints, tcfg, tx, *, batch_size, key,
                 target, mesh, tokenizer, eval_every, eval_samples, reference,
                 moment_feedback, log):  # fmt: skip
        self.policy, self.trainable, self.frozen = policy, trainable, frozen
        self.constraints, self.tcfg, self.tx, self.mesh = constraints, tcfg, tx, mesh
        self.batch_size, self.tokenizer, self.log = batch_size, tokenizer, log
        self.eval_every, self.eval_samples = eval_every, eval_samples
        self.reference, self.moment_feedback = reference, moment_feedback
        self.eval_at_start = eval_every > 0
        self.score = scorer(policy, constraints)
        _, self.k_train, self.k_eval = jax.random.split(key, 3)
        self.ebm, self.info = target
        self.ebm_fit = self.ebm  # the I-projection p: evaluations measure KL(p||pi) against it
        log(f"target: {self.info}")
        check_moment_feedback(moment_feedback, constraints, tcfg)
        if moment_feedback and reference is None:
            raise ValueError("moment_feedback needs `reference` base samples to re-estimate log Z.")
        self.step_fn = jit_align_step(tcfg, tx, policy.logprob_fn, mesh)
        self.ref_logprob = jax.jit(policy.logprob_fn)
        self.t0 = time.perf_counter()

    def init_state(self):
        return init_state(self.trainable, self.tx, self.tcfg, log_z=self.info["log_z"],
                          z_count=self.info["samples"])  # fmt: skip

    def meta(self) -> dict:
        return {
            "align": {
                "method": self.tcfg.method,
                "tuner": dataclasses.asdict(self.tcfg),
                "batch_size": self.batch_size,
                "moment_feedback": self.moment_feedback,
                "constraints": [repr(c) for c in self.constraints],
            }
        }

    def host_state(self) -> dict:
        return {"lambda": [float(x) for x in np.asarray(self.ebm.lam)]}

    def set_host_state(self, state: dict) -> None:
        if "lambda" in state:
            self.ebm = self.ebm.replace_lam(np.asarray(state["lambda"], np.float32))

    def train_step(self, state, step: int):
        policy, frozen = self.policy, self.frozen
        src = state.proposal if self.tcfg.off_policy else state.params
        s = policy.sample(src, frozen, jax.random.fold_in(self.k_train, step), self.batch_size)
        log_a, phi = self.score(frozen, s.tokens, s.mask)
        batch = {"tokens": s.tokens, "mask": s.mask, "log_q": s.log_q, "log_a": log_a, "phi": phi}
        state, m = self.step_fn(state, shard_batch(batch, self.mesh), frozen, self.ebm)
        m = {k: np.asarray(v).tolist() for k, v in jax.device_get(m).items()}
        if not m["z_valid"]:  # Z^ = 0 on this batch: KL^/TVD^ are not estimable (inf)
            for k in ("kl_p_pi", "tvd_p_pi", "log_z", "kl_p_q"):
                m.pop(k, None)
        if self.moment_feedback:
            ref = self.reference
            self.ebm = dual_ascent(self.ebm, self.constraints, m["phi_pi"], self.moment_feedback)
            log_z = log_z_on_base(self.ebm, ref["phi"], ref["log_a"])
            z = est.ZState.create(log_z, len(ref["log_a"]))
            state = state.replace(z=z.replace(skipped=state.z.skipped))
            m["lambda"] = np.asarray(self.ebm.lam).tolist()
            m["log_z_target"] = log_z
        m["wall_s"] = time.perf_counter() - self.t0  # since the loop began (compiles included)
        return state, m

    def evaluate(self, state, step: int) -> dict:
        if not self.eval_every:
            return {}
        return evaluate_policy(self.policy, state.params, self.frozen, self.score,
                               jax.random.fold_in(self.k_eval, step), self.eval_samples,
                               self.batch_size, ebm=self.ebm_fit, reference=self.reference,
                               tokenizer=self.tokenizer, ref_logprob=self.ref_logprob)  # fmt: skip

    def step_record(self, step: int, metrics: dict, state) -> dict:
        return {
            "step": step,
            "loss_hex": float(metrics["loss"]).hex(),
            "params_hash": params_hash(state.params),
        }


_LOG_KEYS = ("kl_pi_a", "phi_pi", "kl_p_pi", "eval/kl_pi_a", "eval/phi_pi", "eval/kl_p_pi",
             "eval/distinct_2", "lambda", "wall_s")  # fmt: skip


def train(
    policy: LMPolicy,
    trainable,
    frozen,
    constraints: Sequence[Constraint],
    tcfg: TunerConfig,
    tx: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    key: jax.Array,
    target: tuple[EBM, dict] | None = None,
    moment_samples: int = 1024,
    mesh=None,
    workdir: str | None = None,
    save_every: int = 0,
    tokenizer=None,
    eval_every: int = 0,
    eval_samples: int = 256,
    reference: dict | None = None,
    moment_feedback: float = 0.0,
    log_step_details: bool = False,
    log: Callable[[str], None] = print,
):
    """Align `trainable` towards the EBM of `constraints` on the one loop; returns (state,
    history rows). Row i holds the evaluation after i updates and the metrics of update i + 1.

    `workdir`: metrics, and checkpoints every `save_every` steps (and at the end) from which
    the same call resumes exactly; None = a temporary folder and no checkpoints.
    `reference` (base samples from `estimate_target(..., return_samples=True)`) adds KL(p||pi)
    and TVD(p, pi) estimated on them to every evaluation (always against the fitted target p).
    `moment_feedback` > 0 adapts lambda after every step on the policy's batch moment
    (`moments.dual_ascent`) and re-estimates log Z on the reference samples (needs `reference`)."""
    import tempfile

    if target is None:
        k_target = jax.random.split(key, 3)[0]
        target = estimate_target(policy, frozen, constraints, k_target, moment_samples,
                                 batch_size, scorer(policy, constraints))  # fmt: skip
    task = AlignTask(policy, trainable, frozen, constraints, tcfg, tx, batch_size=batch_size,
                     key=key, target=target, mesh=mesh, tokenizer=tokenizer,
                     eval_every=eval_every, eval_samples=eval_samples, reference=reference,
                     moment_feedback=moment_feedback, log=log)  # fmt: skip
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lm_jax_align_")
        workdir = tmp.name
    loop_cfg = TrainConfig(
        steps=steps,
        workdir=workdir,
        eval_every=eval_every,
        save_every=save_every,
        log_every=10,
        progress_bar=False,
        log_step_details=log_step_details,
        async_checkpointing=False,
    )

    def loop_log(line: str) -> None:  # resume/save/SIGTERM lines; the rows below are the rest
        if not line.startswith("step "):
            log(line)

    try:
        res = engine.run(task, loop_cfg, loop_log, save=tmp is None)
    finally:
        if tmp is not None:
            tmp.cleanup()
    history = rows_by_update(res.history, steps)
    for h in history:
        if h["step"] % 10 == 0 or h["step"] == steps:
            parts = [f"{k} {np.round(v, 4)}" for k, v in h.items() if k in _LOG_KEYS]
            log(" | ".join([f"step {h['step']}", *parts]))
    return res.state, history


def rows_by_update(rows: list[dict], steps: int) -> list[dict]:
    """Loop rows (metrics of update s and the evaluation after it, at step s) -> the
    alignment convention: row i = evaluation after i updates + metrics of update i + 1."""
    evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows}
    trains = {
        r["step"]: {k: v for k, v in r.items() if k != "step" and not k.startswith("eval/")}
        for r in rows
    }
    out = [{"step": i, **evals.get(i, {}), **trains.get(i + 1, {})} for i in range(steps + 1)]
    return [r for r in out if len(r) > 1]


def load_base(path: str):
    """(ModelConfig, params, tokenizer) from an lm_jax workdir, an HF model folder or a .gguf."""
    if path.endswith(".gguf"):
        return load_any(gguf=path)[:3]
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return load_any(checkpoint=path)[:3]
    return load_any(hf_dir=path)[:3]


def plot_histories(
    histories: dict[str, list[dict]], floor: float | dict[str, float], path: str
) -> None:
    """E_pi[phi_1] and KL(pi||a) (evaluation rows) against steps, one line per method.
    `floor`: KL(p||a), one value, or one per method (runs against different targets: each gets
    its own dashed line in its colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors = floor if isinstance(floor, dict) else dict.fromkeys(histories, floor)
    shared = len({round(v, 9) for v in floors.values()}) == 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        ev = [h for h in hist if "eval/kl_pi_a" in h]
        steps = [h["step"] for h in ev]
        axes[0].plot(steps, [h["eval/phi_pi"][0] for h in ev], marker=".", label=name)
        (line,) = axes[1].plot(steps, [h["eval/kl_pi_a"] for h in ev], marker=".", label=name)
        if not shared:
            axes[1].axhline(floors[name], ls="--", c=line.get_color(), label=f"KL(p||a), {name}")
    floor = max(floors.values())
    if shared:
        axes[1].axhline(floor, ls="--", c="k", label="KL(p||a)")
    top = max(
        (h["eval/kl_pi_a"] for hist in histories.values() for h in hist if "eval/kl_pi_a" in h),
        default=0.0,
    )
    if top > 10 * max(floor, 1.0):  # a collapsed policy (REINFORCE) would flatten the rest
        axes[1].set_yscale("symlog", linthresh=1.0)
        axes[1].set_ylim(bottom=0.0)
    for ax, title in zip(axes, ("E_pi[phi_1]", "KL(pi||a)")):
        ax.set(xlabel="step", title=title)
        ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
