"""The reward-side post-training methods beside DPG on the same target, budget and estimators
(`experiments/align.py --method=dpg,dpo,grpo`).

Both take the constraint's feature as their signal (a moment target such as `wholeword:you=0.5`
cannot be told to a reward maximiser: its feature is the reward) and the DPG run's sample
budget, `steps * batch_size` samples:
  dpo   draws that many samples of the base a, ranks them by phi into pairs (the best against
        the worst, ties dropped, as the sampled token ids: `sampled_pairs.rank_token_pairs`),
        then trains DPO from a on those pairs for `steps` steps (`train.preference.posttrain`;
        reference = a);
  grpo  `steps` GRPO steps of `batch_size` on-policy samples (G = `GROUP` per group, the one
        prompt repeated), reward phi, k3 KL to a (`train.grpo.posttrain`).
Each trained policy is then scored by `loop.evaluate_policy`, the evaluation every DPG run
gets: E_pi[phi], KL(pi||a), KL(p||pi) and TVD(p, pi) on the reference base samples,
Distinct-n, Self-BLEU. Each method trains in its own workdir and resumes there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from lm_jax import adapters as lora_lib
from lm_jax.align.loop import evaluate_policy, sample_many
from lm_jax.align.rewards import make_reward
from lm_jax.configs.base import ConfigError
from lm_jax.configs.train import TrainConfig
from lm_jax.train import grpo as grpo_lib
from lm_jax.train import preference as pref_lib
from lm_jax.train.grpo_data import GRPOConfig, Prompt
from lm_jax.train.preference_data import PreferenceConfig
from lm_jax.train.sampled_pairs import rank_token_pairs

METHODS = ("dpo", "grpo")
EVAL_FILE = "policy_eval.jsonl"  # the per-segment evaluation rows (eval_every > 0)
GROUP = 8  # GRPO completions per group


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The reward-side methods' own knobs (the rest is the DPG run's)."""

    dpo_beta: float = 0.1  # TRL's default
    dpo_pairs_per_step: int = 8
    grpo_beta: float = 0.04  # k3 KL weight (TRL's default)
    grpo_loss_type: str = "grpo"


def feature_reward_spec(spec: str) -> str:
    """The reward of a constraint spec: its feature (`wholeword:you=0.5` -> `wholeword:you`;
    an "=" not followed by a number belongs to the pattern, as `parse_constraint` reads it)."""
    body, eq, value = spec.rpartition("=")
    if not eq or ":" not in body:
        return spec
    try:
        float(value)
    except ValueError:
        return spec
    return body


def run_baseline(method: str, *, cfg, params, tokenizer, policy, frozen, score, target,
                 reference, constraint_specs: Sequence[str], prompt: str, steps: int,
                 batch_size: int, learning_rate: float, seed: int, workdir: str,
                 eval_samples: int, key, mesh=None, bcfg: BaselineConfig = BaselineConfig(),
                 eval_every: int = 0, initial=None,
                 log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Train `method` (dpo | grpo) from the base (`cfg`, `params`, with `policy`'s LoRA shape)
    and return `evaluate_policy`'s row for the result plus {"method", "samples", ...}.

    `eval_every` > 0: the run goes in segments of that many steps, each resuming the last
    (a constant learning rate, so the trajectory is the one of a single run), and the policy is
    scored after each and at step 0 (`initial`: the policy's untrained trainable params, as
    `make_lm_policy` returns them); those rows go to `workdir/policy_eval.jsonl` (the final
    row is the same as without segments)."""
    if method not in METHODS:
        raise ConfigError(f"unknown post-training baseline {method!r}: use one of {METHODS}.")
    if len(constraint_specs) != 1:
        raise ConfigError(
            f"--method={method} takes one --constraint (its feature is the reward), got "
            f"{len(constraint_specs)}."
        )
    lora = policy.config.lora
    n_new = policy.sampler.max_new_tokens
    ends = sorted({*range(eval_every, steps, eval_every), steps}) if eval_every > 0 else [steps]
    tcfg = TrainConfig(steps=steps, learning_rate=learning_rate, lr_schedule="constant",
                       warmup_steps=0, weight_decay=0.0, eval_every=0, save_every=steps,
                       log_every=max(1, min(25, steps)), seed=seed, workdir=workdir,
                       progress_bar=False, async_checkpointing=False)  # fmt: skip
    k_data, k_eval = jax.random.split(jax.random.fold_in(key, 0xD90 + METHODS.index(method)))
    extra: dict = {}
    base_cfg = cfg.replace(lora=None)
    if method == "dpo":
        n = steps * batch_size
        s = sample_many(lambda k, b: policy.sample_base(frozen, k, b), k_data, n, batch_size)
        _, phi = score(frozen, s.tokens, s.mask)
        P, toks, mask = len(policy.sampler.prompt), np.asarray(s.tokens), np.asarray(s.mask)
        comps = [r[P:][m[P:] > 0] for r, m in zip(toks, mask)]  # the sampled tokens exactly
        pairs = rank_token_pairs(policy.sampler.prompt, comps, np.asarray(phi)[:, 0])
        extra = {"samples": n, "pairs": len(pairs), "phi_a_samples": float(np.mean(phi[:, 0]))}
        log(f"dpo: {n} base samples -> {len(pairs)} pairs (phi=1 against phi=0)")
        if not pairs:
            raise ConfigError(
                f"dpo: none of the {n} base samples differ in the constraint's feature, so no "
                "pair can be ranked; raise --train.steps or --align.batch_size."
            )
        pcfg = PreferenceConfig(method="dpo", beta=bcfg.dpo_beta,
                                seq_len=len(policy.sampler.prompt) + n_new + 1,
                                batch_size=bcfg.dpo_pairs_per_step, lora=lora,
                                eval_batch_size=batch_size)  # fmt: skip
        def train(tc):
            return pref_lib.posttrain(base_cfg, params, tokenizer, pairs, tc, pcfg, mesh=mesh,
                                      log=log)  # fmt: skip
    else:
        if batch_size % GROUP:
            raise ConfigError(f"grpo: --align.batch_size must be a multiple of {GROUP}, "
                              f"got {batch_size}.")  # fmt: skip
        gcfg = GRPOConfig(num_generations=GROUP, prompts_per_step=batch_size // GROUP,
                          beta=bcfg.grpo_beta, loss_type=bcfg.grpo_loss_type,
                          reward=feature_reward_spec(constraint_specs[0]),
                          max_new_tokens=n_new, temperature=1.0,
                          prompt_len=max(1, len(policy.sampler.prompt)), lora=lora)  # fmt: skip
        reward = make_reward(gcfg.reward, tokenizer)
        def train(tc):
            return grpo_lib.posttrain(base_cfg, params, tokenizer, [Prompt(prompt)], reward, tc,
                                      gcfg, mesh=mesh, log=log)  # fmt: skip
        extra = {"samples": steps * batch_size}

    def evaluate(trainable, step: int) -> dict:
        k = k_eval if step == steps else jax.random.fold_in(k_eval, step)
        row = evaluate_policy(policy, trainable, frozen, score, k, eval_samples, batch_size,
                              ebm=target[0], reference=reference, tokenizer=tokenizer)  # fmt: skip
        return {"step": step, **row}

    rows = []
    if eval_every > 0 and initial is not None:  # the base model, as DPG's step 0
        rows.append(evaluate(initial, 0))
    for end in ends:
        out = train(tcfg.replace(steps=end, save_every=end))
        if int(out["state"].step) != end:  # a workdir already past this segment: no row
            log(f"{method}: {workdir} is at step {int(out['state'].step)}, past {end}")
            continue
        trained = jax.device_get(out["params"])
        rows.append(evaluate(lora_lib.split_lora(trained)[1] if lora is not None else trained,
                             end))  # fmt: skip
    if eval_every > 0:
        with open(os.path.join(workdir, EVAL_FILE), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    final = {k: v for k, v in rows[-1].items() if k != "step"}
    return {"method": method, **extra, **final}
