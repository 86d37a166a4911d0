"""Experiment (issue 4): an MoE model vs a dense model with the same active parameters, same
tokens, on the default corpus; and expert load with vs without the load-balancing loss.

  .venv/bin/python -m benchmarks.moe_vs_dense --steps=600 --out=benchmarks/moe_vs_dense.png

Dense: Llama style, 4 layers, d 128, SwiGLU F 344. MoE: 8 experts of F 172, top-2 (same active
expert parameters per token), dropless, in every layer. Char tokenizer, seq 128, batch 16.
Same data order and seed for every model. After training, each MoE model's per-layer expert
loads are measured on `--load_batches` validation batches (the training logs average the load
over layers, which can hide per-layer imbalance): fraction of token copies per expert, max/min
ratio, max fraction and load entropy / log E. A JSON summary goes next to the plot
(`--replot` redraws the plot from it).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from lm_jax.configs import MoEConfig, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.data import DataConfig, make_text_dataset
from lm_jax.nn import Transformer
from lm_jax.train.loop import Experiment, train

flags.DEFINE_integer("steps", 600, "Training steps per model.")
flags.DEFINE_string("out", "benchmarks/moe_vs_dense.png", "Loss-curve plot.")
flags.DEFINE_string("source", "shakespeare", "Data source.")
flags.DEFINE_integer("seed", 0, "Init and data-order seed (the same for every model).")
flags.DEFINE_list("runs", ["dense", "moe", "moe_no_balance"], "Which models to train.")
flags.DEFINE_bool("replot", False, "Only redraw --out from its JSON summary.")
flags.DEFINE_integer("load_batches", 10, "Validation batches for the per-layer expert loads.")
FLAGS = flags.FLAGS


def layer_loads(result: dict, exp: Experiment) -> np.ndarray:
    """Per-layer expert load [L, E] (fraction of token copies) on validation batches."""
    cfg, params = result["model_config"], result["state"].params
    model = Transformer(cfg)
    fn = jax.jit(
        lambda p, x: model.apply({"params": p}, x, mutable=["aux"])[1]["aux"],
    )
    it = make_text_dataset(exp.data, result["tokenizer"], "validation", repeat=False)
    total = 0.0
    for i, batch in enumerate(it):
        if i >= FLAGS.load_batches:
            break
        aux = fn(params, batch["inputs"])
        loads = [
            v["load"]
            for path, v in jax.tree_util.tree_leaves_with_path(
                aux, is_leaf=lambda x: isinstance(x, dict) and "load" in x
            )
            if isinstance(v, dict)
        ]
        total = total + np.concatenate([np.asarray(x).reshape(-1, x.shape[-1]) for x in loads])
    return total / np.sum(total, axis=-1, keepdims=True)  # [L, E]


def load_stats(loads: np.ndarray) -> dict:
    E, loads = loads.shape[-1], loads.astype(np.float64)
    ent = -np.sum(np.where(loads > 0, loads * np.log(np.maximum(loads, 1e-30)), 0.0), -1)
    return {
        "per_layer_loads": np.round(loads, 4).tolist(),
        "max_fraction": np.round(loads.max(-1), 4).tolist(),
        "min_fraction": np.round(loads.min(-1), 4).tolist(),
        "max_over_min": [
            round(float(a / b), 2) if b > 0 else math.inf
            for a, b in zip(loads.max(-1), loads.min(-1))
        ],
        "entropy_over_logE": np.round(ent / np.log(E), 4).tolist(),
    }


def run(name: str, model, workdir: str) -> dict:
    exp = Experiment(
        model=model,
        data=DataConfig(
            source=FLAGS.source, tokenizer="char", seq_len=128, batch_size=16, seed=FLAGS.seed
        ),
        train=TrainConfig(
            steps=FLAGS.steps,
            seed=FLAGS.seed,
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
    t0 = time.time()
    result = train(exp, log=lambda *_: None)
    seconds = time.time() - t0
    rows = [json.loads(x) for x in open(os.path.join(workdir, name, "metrics.jsonl"))]
    out = {"result": result, "rows": rows, "seconds": seconds}
    if model.moe is not None:
        out["loads"] = load_stats(layer_loads(result, exp))
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in summary.items() if isinstance(v, dict)}
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    color = {name: f"C{i}" for i, name in enumerate(runs)}
    for name, r in runs.items():
        ax[0].plot(*zip(*r["val_curve"]), marker="o", label=name, color=color[name])
        if r.get("train_max_load"):
            ax[1].plot(*zip(*r["train_max_load"]), label=name, color=color[name])
    ax[0].set(xlabel="step", ylabel="validation loss (nats/char)", title="MoE vs dense (val loss)")
    ax[1].axhline(1 / 8, color="gray", ls="--", label="balanced (1/8)")
    ax[1].set(
        xlabel="step",
        ylabel="fraction of token copies",
        title="max expert load (train, layer mean)",
    )
    names = [n for n in runs if "loads" in runs[n]]
    for j, name in enumerate(names):
        L = len(runs[name]["loads"]["max_fraction"])
        xs = np.arange(L) + 0.4 * (j - (len(names) - 1) / 2)
        ax[2].bar(xs, runs[name]["loads"]["max_fraction"], 0.38, label=name, color=color[name])
        ax[2].bar(xs, runs[name]["loads"]["min_fraction"], 0.38, color="k", alpha=0.35)
        ax[2].set_xticks(np.arange(L))
    ax[2].axhline(1 / 8, color="gray", ls="--", label="balanced (1/8)")
    ax[2].set(
        xlabel="layer",
        ylabel="fraction of token copies",
        title="final per-layer load (val): max; min dark",
    )
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main(_):
    if FLAGS.replot:
        with open(os.path.splitext(FLAGS.out)[0] + ".json") as f:
            return plot(json.load(f), FLAGS.out)
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
    summary = {"steps": FLAGS.steps, "source": FLAGS.source, "seed": FLAGS.seed}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in runs.items():
            if name not in FLAGS.runs:
                continue
            r = run(name, cfg, tmp)
            ev = r["result"]["eval"]
            rows = r["rows"]
            summary[name] = {
                "val_loss": round(ev["loss"], 4),
                "val_bits_per_byte": round(ev.get("bits_per_byte", float("nan")), 4),
                "val_curve": [
                    (x["step"], round(x["eval/loss"], 4)) for x in rows if "eval/loss" in x
                ],
                "train_loss_last": round(r["result"]["train"].get("train/loss", float("nan")), 4),
                "train_max_load": [
                    (x["step"], round(max(x["train/moe/load"]), 4))
                    for x in rows
                    if "train/moe/load" in x
                ],
                "seconds": round(r["seconds"], 1),
                **({"loads": r["loads"]} if "loads" in r else {}),
            }
            print(f"{name}: {json.dumps(summary[name])}", flush=True)
    with open(os.path.splitext(FLAGS.out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
