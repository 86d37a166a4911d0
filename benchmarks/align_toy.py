r"""Every tuner on the exact toy (lm_jax.align.toy: V=4, T=4, 256 sequences, tabular policy),
same budget, exact metrics of the final policy: the distributional tuners, REINFORCE / KL-PG,
and the post-training baselines DPO (pairs of base samples ranked by phi) and GRPO (phi as
reward; lm_jax.align.toy_baselines). H(pi) is the exact entropy (diversity), beside H(p).

  python -m benchmarks.align_toy --steps=300
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lm_jax.align import METHODS, Constraint, feature_matrix, make_ebm, token_sequences_feature
from lm_jax.align import toy as tb
from lm_jax.align.toy_baselines import train_dpo, train_grpo

flags.DEFINE_integer("steps", 300, "Steps per method.")
flags.DEFINE_integer("batch", 256, "Samples per step.")


def main(_):
    F = flags.FLAGS
    word = token_sequences_feature("12", [(1, 2)])
    a = tb.init_table(jax.random.key(1))
    xs = tb.all_sequences()
    phi = feature_matrix([word], xs, jnp.ones(xs.shape))[:, 0]
    ebm = make_ebm([Constraint(word)])
    log_a = tb.logprob(a, xs)
    log_p = ebm.log_score(log_a, phi[:, None])
    base = tb.exact(log_p, log_a, log_a)
    print(
        f"Z = {base['z']:.4f}, floor -log Z = {-np.log(base['z']):.4f}, "
        f"E_a[phi] = {float(jnp.exp(log_a) @ phi):.4f}, KL(p||a) start = {base['kl_p_pi']:.3f}"
    )
    p = np.exp(np.asarray(log_p, np.float64)) / base["z"]
    print(f"H(p) = {-np.sum(p[p > 0] * np.log(p[p > 0])):.3f} nats, H(a) = "
          f"{-float(jnp.exp(log_a) @ log_a):.3f}")  # fmt: skip
    print("| method | E_pi[phi] | KL(p‖pi) | TVD(p, pi) | KL(pi‖a) | KL(pi‖a) / -log Z | H(pi) "
          "| s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    runs = {m: lambda m=m: tb.train(a, [word], ebm, m, steps=F.steps, batch=F.batch)[0].params
            for m in METHODS}  # fmt: skip
    for beta in (0.1, 1.0):
        runs[f"dpo (beta {beta})"] = lambda beta=beta: train_dpo(
            a, [word], F.steps, F.batch, beta=beta)[0]  # fmt: skip
    for beta, loss in ((0.04, "grpo"), (0.0, "grpo"), (0.04, "dr_grpo")):
        runs[f"{loss} (beta {beta})"] = lambda beta=beta, loss=loss: train_grpo(
            a, [word], F.steps, F.batch, beta=beta, loss_type=loss)[0]  # fmt: skip
    for m, fit in runs.items():
        t = time.perf_counter()
        lp = tb.logprob(fit(), xs)
        ex = tb.exact(log_p, lp, log_a)
        e_phi = float(jnp.exp(lp) @ phi)
        ratio = ex["kl_pi_a"] / -np.log(base["z"])
        ent = -float(jnp.exp(lp) @ lp)
        print(
            f"| {m} | {e_phi:.4f} | {ex['kl_p_pi']:.4f} | {ex['tvd']:.4f} | "
            f"{ex['kl_pi_a']:.3f} | {ratio:.2f} | {ent:.3f} | {time.perf_counter() - t:.1f} |"
        )


if __name__ == "__main__":
    app.run(main)
