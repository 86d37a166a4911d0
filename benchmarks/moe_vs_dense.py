"""Experiment (issue 4): an MoE model vs a dense model with the same active parameters, same
tokens, on the default corpus; and expert load with vs without the load-balancing loss.

  .venv/bin/python -m benchmarks.moe_vs_dense --steps=600 --out=benchmarks/moe_vs_dense.png

Dense: Llama style, 4 layers, d 128, SwiGLU F 344. MoE: 8 experts of F 172, top-2 (same active
expert parameters per token), dropless, in every layer. Char tokenizer, seq 128, batch 16.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import app, flags, logging

from lm_jax.configs import MoEConfig, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.data import DataConfig
from lm_jax.train.loop import Experiment, train

flags.DEFINE_integer("steps", 600, "Training steps per model.")
flags.DEFINE_string("out", "benchmarks/moe_vs_dense.png", "Loss-curve plot.")
flags.DEFINE_string("source", "shakespeare", "Data source.")
FLAGS = flags.FLAGS


def run(name: str, model, workdir: str) -> dict:
    exp = Experiment(
        model=model,
        data=DataConfig(source=FLAGS.source, tokenizer="char", seq_len=128, batch_size=16),
        train=TrainConfig(
            steps=FLAGS.steps,
            learning_rate=2e-3,
            warmup_steps=50,
            eval_every=max(FLAGS.steps // 6, 1),
            eval_batches=40,
            log_every=10,
            save_every=0,
            workdir=os.path.join(workdir, name),
            progress_bar=False,
        ),
    )
    result = train(exp, log=lambda *_: None)
    rows = [json.loads(x) for x in open(os.path.join(workdir, name, "metrics.jsonl"))]
    return {"result": result, "rows": rows}


def main(_):
    logging.set_verbosity(logging.WARNING)
    base = llama_style(
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=344,
        max_len=128,
        scan_unroll=4,
    )
    moe = MoEConfig(num_experts=8, top_k=2, expert_mlp_dim=172)
    runs = {
        "dense": base,
        "moe": base.replace(moe=moe),
        "moe_no_balance": base.replace(
            moe=moe.__class__(**{**moe.__dict__, "load_balance_coef": 0.0})
        ),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in runs.items():
            out[name] = run(name, cfg, tmp)
            ev = out[name]["result"]["eval"]
            loads = [r["train/moe/load"] for r in out[name]["rows"] if "train/moe/load" in r]
            print(
                f"{name}: final val loss {ev['loss']:.4f}"
                + (f", expert load at end {[round(x, 3) for x in loads[-1]]}" if loads else "")
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in out.items():
        ev = [(x["step"], x["eval/loss"]) for x in r["rows"] if "eval/loss" in x]
        ax[0].plot(*zip(*ev), marker="o", label=name)
        loads = [x["train/moe/load"] for x in r["rows"] if "train/moe/load" in x]
        if loads:
            ax[1].plot([max(x) for x in loads], label=f"{name}: max expert load")
    ax[0].set(xlabel="step", ylabel="validation loss (nats/char)", title="MoE vs dense")
    ax[1].set(xlabel="log interval", ylabel="fraction of tokens", title="most-loaded expert")
    ax[1].axhline(1 / 8, color="gray", ls="--", label="balanced (1/8)")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(FLAGS.out, dpi=100)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
