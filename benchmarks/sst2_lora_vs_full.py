r"""SmolLM2-135M-Instruct (GGUF) fine-tuned on SST-2 as text-to-label: LoRA vs full fine-tuning.

  nice .venv/bin/python -m benchmarks.sst2_lora_vs_full --steps=40 --test_limit=300

Runs, one after the other in this process: zero-shot label scoring of the base model (optional),
LoRA r 8 (attention + MLP projections), full fine-tuning. Each reports trainable parameters,
optimizer-state bytes, median warm step time and test accuracy (label-word log-likelihood after
'Review: <text>\nSentiment:'). Writes a JSON report (--out) and prints a markdown table.
"""

from __future__ import annotations

import datetime
import json
import time

from absl import app, flags, logging

flags.DEFINE_integer("steps", 40, "Optimizer steps per run.")
flags.DEFINE_integer("batch_size", 8, "Examples per step.")
flags.DEFINE_integer("seq_len", 64, "Row length in tokens.")
flags.DEFINE_integer("test_limit", 300, "First N of the 1,821 test sentences (None = all).")
flags.DEFINE_float("lora_lr", 1e-3, "LoRA peak learning rate.")
flags.DEFINE_float("full_lr", 3e-5, "Full fine-tuning peak learning rate.")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank.")
flags.DEFINE_bool("zero_shot", True, "Also score the untouched base model.")
flags.DEFINE_string("workdir", "/tmp/sst2_lora_vs_full", "Run folders go below this.")
flags.DEFINE_string("out", "", "Write the JSON report here.")


def main(argv):
    del argv
    F = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    from benchmarks.common import machine
    from lm_jax.configs.train import TrainConfig
    from lm_jax.train import finetune as ft_lib

    rows = {}
    if F.zero_shot:
        cfg, params, tok, _ = ft_lib.load_source(gguf=ft_lib.default_gguf())
        test = ft_lib.sst2("test", limit=F.test_limit)
        t0 = time.perf_counter()
        rep = ft_lib.classify(cfg, params, tok, test, seq_len=F.seq_len)
        rows["zero-shot"] = {"test_accuracy": rep["accuracy"], "test_n": rep["n"]}
        rows["zero-shot"]["test_seconds"] = time.perf_counter() - t0
        print("zero-shot", rows["zero-shot"], flush=True)
        del params
    for name, rank, lr in (("lora", F.lora_rank, F.lora_lr), ("full", 0, F.full_lr)):
        ft = ft_lib.FinetuneConfig(
            seq_len=F.seq_len,
            batch_size=F.batch_size,
            lora=ft_lib.lora_config(rank, 2.0 * rank if rank else 16.0),
        )
        train_cfg = TrainConfig(
            steps=F.steps,
            learning_rate=lr,
            warmup_steps=max(1, F.steps // 8),
            weight_decay=0.0,
            log_every=10,
            workdir=f"{F.workdir}/{name}",
        )
        t0 = time.perf_counter()
        rows[name] = ft_lib.run(
            task="sst2", eval_limit=32, test_limit=F.test_limit, ft=ft, train_cfg=train_cfg
        )
        rows[name]["learning_rate"] = lr
        rows[name]["wall_s"] = time.perf_counter() - t0
        print(name, json.dumps(rows[name], default=str), flush=True)
    report = {"date": str(datetime.date.today()), "machine": machine(), "runs": rows}
    print(
        "| run | trainable params (%) | optimizer state | step time (median) | test acc |\n"
        "|---|---|---|---|---|"
    )
    for name, r in rows.items():
        tp = f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%)" if "params" in r else "0"
        opt = f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB" if "params" in r else "-"
        st = f"{r['step_time_s_median']:.2f} s" if "params" in r else "-"
        print(f"| {name} | {tp} | {opt} | {st} | {r['test_accuracy']:.4f} (n={r['test_n']}) |")
    if F.out:
        with open(F.out, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
