r"""Distributional alignment (GDC / DPG and baselines) of a pretrained LM.

  python experiments/align.py --base=/tmp/shakespeare --constraint=word:love \
      --method=dpg,reinforce --train.steps=100 --train.workdir=/tmp/align
  python experiments/align.py --base=model.gguf --constraint=word:she=0.5 --method=kl_dpg

--base: an lm_jax training workdir, a Hugging Face model folder, or a .gguf file.
Metrics go to <workdir>/<method>/metrics.jsonl + TensorBoard; <workdir>/align.png plots
E_pi[phi] and KL(pi||a) per method against the floor KL(p||a).
Flags: `--train.x` (steps, learning_rate, lr_schedule, min_lr_ratio, eval_every, mesh, seed,
workdir, save_every, log_step_details), `--align.x` (AlignConfig below), `--tuner.x`
(lm_jax.align.TunerConfig but method, which is --method). Each method's run checkpoints in
<workdir>/<method> and a rerun of the same command resumes it. --method=dpo,grpo train the
reward-side baselines on the same budget (steps x batch_size samples; the constraint's feature
as the reward) and score them with the same evaluation (lm_jax/align/posttrain_baselines.py).
The pre-1.0 spellings (--steps, --lr, --batch_size, ...) still work for one release, with a
warning.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import flags

from lm_jax import cli
from lm_jax.align.tuners import TunerConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Sampling and estimation of one alignment run (`--align.<field>`)."""

    batch_size: int = 64  # samples per step
    lora_rank: int = 8  # LoRA rank of the policy (alpha = 2 * rank); 0 = full-parameter policy
    max_new_tokens: int = 40  # sampled continuation length
    moment_samples: int = 2048  # base samples for lambda and Z
    eval_samples: int = 256  # policy samples per evaluation
    moment_feedback: float = 0.0  # moment targets: lambda += rate (mu_bar - E_pi[phi]); 0 = off
    logits_chunk: int = 0  # > 0: policy log-probs with the LM head this many positions at a time

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens", "moment_samples", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.logits_chunk < 0:
            raise ConfigError(f"logits_chunk must be >= 0 (0 = off), got {self.logits_chunk}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0 = full), got {self.lora_rank}")


TRAIN_FIELDS = ("steps", "learning_rate", "lr_schedule", "min_lr_ratio", "eval_every")
TRAIN_FIELDS += ("mesh", "seed", "workdir", "save_every", "log_step_details")
flags.DEFINE_string("base", None, "Checkpoint workdir, HF model dir or .gguf file.", required=True)
flags.DEFINE_multi_string("constraint", [], "word:W, regex:R (pointwise) or word:W=0.5 (moment).")
flags.DEFINE_list("method", ["dpg"], "dpg, kl_dpg, fdpg_{fkl,rkl,tv,js,chi2}, reinforce, kl_pg; "
                  "dpo and grpo (the reward-side baselines, lm_jax/align/posttrain_baselines.py).")
flags.DEFINE_string("prompt", "\n", "Text every sample continues.")
cli.define_config("train", TrainConfig, fields=TRAIN_FIELDS)
cli.define_config("align", AlignConfig)
cli.define_config(
    "tuner", TunerConfig, fields=[f.name for f in dataclasses.fields(TunerConfig)][1:]
)
for _old in ("steps", "lr_schedule", "min_lr_ratio", "eval_every", "mesh", "seed", "workdir"):
    cli.deprecate(_old, f"train.{_old}")
cli.deprecate("lr", "train.learning_rate")
for _f in dataclasses.fields(AlignConfig):
    cli.deprecate(_f.name, f"align.{_f.name}")
cli.deprecate("kl_adaptive_every", "tuner.kl_adaptive_every")


def defaults() -> tuple[TrainConfig, AlignConfig]:
    train = TrainConfig(steps=100, learning_rate=1e-3, lr_schedule="constant", eval_every=25)
    return train.replace(workdir="/tmp/align", save_every=25), AlignConfig()


def check_base(path: str) -> None:
    """A --base that is no model fails here with what it is and what to give."""
    from lm_jax.checkpoint import CheckpointError, not_a_workdir

    if path.endswith(".gguf") or os.path.isdir(os.path.join(path, "checkpoints")):
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        msg = not_a_workdir(path)
        if "give --checkpoint" in msg:
            msg = msg.replace("give --checkpoint", "give --base") + " (or an HF folder, a .gguf)"
        raise CheckpointError(msg)


def main(argv):
    import jax
    import optax

    from lm_jax.align import parse_constraint
    from lm_jax.align.loop import (
        estimate_target,
        load_base,
        plot_histories,
        rows_by_update,
        scorer,
        train,
    )
    from lm_jax.align.moments import check_moment_feedback
    from lm_jax.align.policies import make_lm_policy
    from lm_jax.align.samplers import SamplerConfig
    from lm_jax.configs.lora import LoraConfig
    from lm_jax.optim import policy_lr_schedule
    from lm_jax.sharding import make_mesh
    from lm_jax.train.engine import read_history

    F = flags.FLAGS
    if not F.constraint:
        raise ConfigError("give at least one --constraint, e.g. --constraint=word:love")
    t0, a0 = defaults()
    tc, ac = cli.config("train", t0), cli.config("align", a0)
    tuner = lambda m: cli.config("tuner", TunerConfig(m))  # noqa: E731
    from lm_jax.align.posttrain_baselines import GROUP, run_baseline
    from lm_jax.align.posttrain_baselines import METHODS as BASELINES

    # validates names before any work
    methods = [m if m in BASELINES else tuner(m).method for m in F.method]
    if any(m in BASELINES for m in methods) and len(F.constraint) != 1:
        raise ConfigError("--method=dpo/grpo take exactly one --constraint: its feature is the "
                          "reward.")  # fmt: skip
    if "grpo" in methods and ac.batch_size % GROUP:
        raise ConfigError(f"--method=grpo samples groups of {GROUP}: --align.batch_size must be "
                          f"a multiple of {GROUP}, got {ac.batch_size}.")  # fmt: skip
    lr = lambda: policy_lr_schedule(tc.learning_rate, tc.steps, tc.lr_schedule, tc.min_lr_ratio)  # noqa: E731
    lr()  # and the schedule
    mesh, key = make_mesh(tc.mesh), jax.random.key(tc.seed)  # and the mesh
    check_base(F.base)
    cfg, params, tok = load_base(F.base)
    cons = [parse_constraint(s, tok) for s in F.constraint]
    for m in methods:  # before any sampling
        if m not in BASELINES:
            check_moment_feedback(ac.moment_feedback, cons, tuner(m))
    stop = () if tok.eos_id is None else (tok.eos_id,)
    scfg = SamplerConfig(ac.max_new_tokens, stop, tuple(tok.encode(F.prompt)))
    lora = LoraConfig(rank=ac.lora_rank, alpha=2.0 * ac.lora_rank) if ac.lora_rank else None
    policy_args = (cfg, params, scfg, lora, tc.seed, ac.logits_chunk)
    histories = {}
    with jax.set_mesh(mesh):
        policy, _, frozen = make_lm_policy(*policy_args)
        *target, ref = estimate_target(
            policy, frozen, cons, key, ac.moment_samples, ac.batch_size, return_samples=True
        )
        summary = {"target": target[1], "methods": {}}
        kw = dict(steps=tc.steps, batch_size=ac.batch_size, key=key, target=tuple(target))
        kw.update(mesh=mesh, tokenizer=tok, eval_every=tc.eval_every)
        kw.update(eval_samples=ac.eval_samples, reference=ref, moment_feedback=ac.moment_feedback)
        for m in methods:
            policy, trainable, frozen = make_lm_policy(*policy_args)
            wd = os.path.join(tc.workdir, m)  # one resumable run per method
            if m in BASELINES:  # same target, budget and evaluation (every eval_every steps)
                summary["methods"][m] = run_baseline(
                    m, cfg=cfg, params=params, tokenizer=tok, policy=policy, frozen=frozen,
                    score=scorer(policy, cons), target=tuple(target), reference=ref,
                    constraint_specs=F.constraint, prompt=F.prompt, steps=tc.steps,
                    batch_size=ac.batch_size, learning_rate=tc.learning_rate, seed=tc.seed,
                    workdir=wd, eval_samples=ac.eval_samples, key=key, mesh=mesh,
                    eval_every=tc.eval_every, initial=trainable)  # fmt: skip
                continue
            tx = optax.adam(lr())
            kw.update(workdir=wd, save_every=tc.save_every, log_step_details=tc.log_step_details)
            train(policy, trainable, frozen, cons, tuner(m), tx, **kw)
            hist = rows_by_update(read_history(wd), tc.steps)  # the whole run, resumed or not
            histories[m] = hist
            ev = [h for h in hist if "eval/kl_pi_a" in h]
            summary["methods"][m] = ev[-1] if ev else hist[-1]
    if histories:  # the tuners' curves (the baselines have no per-step evaluation)
        plot_histories(histories, target[1]["kl_p_a"], os.path.join(tc.workdir, "align.png"))
    with open(os.path.join(tc.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    cli.run(main)
