r"""Evaluate a model on a task; writes a JSON report (--out) and prints a table.

  python experiments/evaluate.py --gguf=<SmolLM2.gguf> --task=perplexity \
      --data_source=tinyshakespeare:../shared/data/tinyshakespeare/input.txt --limit=4096
  python experiments/evaluate.py --gguf=<SmolLM2.gguf> --task=sst2 --shots=4 --limit=200
  python experiments/evaluate.py --checkpoint=runs/m30k --task=multi30k_en_de --out=report.json

  python experiments/evaluate.py --gguf=<SmolLM2.gguf> --task=bigbench:hhh_alignment
  python experiments/evaluate.py --gguf=<SmolLM2.gguf> --task=ptb --window=1024
  python experiments/evaluate.py --gguf=smollm2 --adapters=runs/chat --task=bigbench:hhh_alignment

Tasks: perplexity, sst2 (option likelihood, --shots), sst2_head (head on frozen features),
multi30k_en_de (greedy translation, BLEU / chrF / ROUGE), bigbench:<name> (BIG-bench multiple
choice, acc / acc_norm, as lm-eval scores it), ptb (word-level perplexity). See
lm_jax/eval/tasks.py; the lm-eval backend is `python -m lm_jax.eval.harness`.
"""

from __future__ import annotations

import json

from absl import flags

from lm_jax import cli

flags.DEFINE_string("checkpoint", "", "lm_jax training workdir (newest checkpoint).")
flags.DEFINE_string("hf_dir", "", "Hugging Face model folder (config.json + safetensors).")
flags.DEFINE_string("gguf", "", "llama.cpp GGUF file, or a packaged name: smollm2, gemma3.")
flags.DEFINE_string("adapters", "", "LoRA adapters to merge into the model: a fine-tuning "
                    "workdir trained with LoRA (or its adapters folder).")
flags.DEFINE_string("task", "perplexity", "Task name (an unknown name lists the tasks).")
flags.DEFINE_string("data_source", "", "perplexity: lm_jax.data source, e.g. tinyshakespeare:<p>.")
flags.DEFINE_string("split", None, "Split (perplexity: validation; multi30k: test_2016_flickr).")
flags.DEFINE_string("data_dir", None, "Folder with sst2/ and multi30k/ (default ../shared/data).")
flags.DEFINE_integer("limit", None, "Examples to use (perplexity: scored tokens).")
flags.DEFINE_integer("shots", None, "sst2: in-context examples (0 = zero-shot).")
flags.DEFINE_integer("window", None, "perplexity: tokens per context window.")
flags.DEFINE_integer("stride", None, "perplexity: window stride (< window: sliding).")
flags.DEFINE_integer("batch_size", None, "Rows per forward pass.")
flags.DEFINE_integer("logits_chunk", None, "perplexity: LM head N positions at a time (0 = off).")
flags.DEFINE_integer("train_limit", None, "sst2_head: training examples.")
flags.DEFINE_string("pool", None, "sst2_head: mean or last.")
flags.DEFINE_string("out", "", "Write the JSON report here.")


def table(report: dict) -> str:
    rows = [(k, v) for k, v in report.items() if not isinstance(v, (list, dict))]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def _is_seq2seq(workdir: str) -> bool:
    import os

    from lm_jax.checkpoint import read_meta

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    try:
        return "seq2seq" in read_meta(workdir)[1]
    except Exception:  # noqa: BLE001 - not a readable workdir: load_model says why
        return False


def _seq2seq(F) -> int:
    """multi30k_en_de on an encoder-decoder workdir (experiments/train_seq2seq.py): beam search."""
    from lm_jax.eval.tasks import DEFAULT_DATA_DIR, load_multi30k
    from lm_jax.sharding import make_mesh
    from lm_jax.train.seq2seq import evaluate_translation

    if F.task != "multi30k_en_de":
        cli.fail(
            f"{F.checkpoint} is an encoder-decoder run: it evaluates --task=multi30k_en_de only"
        )
    split = F.split or "test_2016_flickr"
    en, de = load_multi30k(F.data_dir or DEFAULT_DATA_DIR, split)
    en, de = en[: F.limit], de[: F.limit]
    report = {"split": split, **evaluate_translation(F.checkpoint, en, de, make_mesh(""),
                                                      eval_batch_size=F.batch_size)}  # fmt: skip
    print(table(report))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


def main(argv):
    F = flags.FLAGS
    from lm_jax.eval.tasks import get_task, load_model, run_task

    get_task(F.task)  # unknown task: fail before loading anything
    if F.checkpoint and _is_seq2seq(F.checkpoint):
        return _seq2seq(F)
    model = load_model(F.checkpoint, F.hf_dir, F.gguf, F.adapters)
    opts = {
        k: getattr(F, k)
        for k in (
            "data_source",
            "split",
            "data_dir",
            "limit",
            "shots",
            "window",
            "stride",
            "batch_size",
            "logits_chunk",
            "train_limit",
            "pool",
        )
    }
    report = run_task(F.task, model, **opts)
    print(table(report))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    cli.run(main)
