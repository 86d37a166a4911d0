r"""Training tokens/s: lm_jax vs HF transformers GPT2LMHeadModel + torch AdamW (CPU, eager).

Config (issue "Training stack"): 6 layers, d 384, 6 heads, seq 256, batch 8, vocab 8192, f32.
Each framework runs in its own process (torch's OpenMP threads otherwise spin and steal the
cores from XLA); rounds alternate the order; a matmul probe runs before and after each round.

  .venv/bin/python -m benchmarks.train_throughput --rounds=7 --steps=4
  .venv/bin/python -m benchmarks.train_throughput --rounds=7 --steps=4 \
      --hf_flax_python=/tmp/hfflax/bin/python

The second adds HF's own Flax GPT-2 (transformers < 5, in its own interpreter; set-up in
`benchmarks/hf_flax_gpt2_worker.py`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time

import jax
import torch
from absl import app, flags

from benchmarks.common import machine, matmul_peak_flops, median, random_lm_batch
from lm_jax.configs import gpt2_style
from lm_jax.configs.train import TrainConfig
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.state import init_train_state
from lm_jax.train.step import jit_train_step

flags.DEFINE_integer("rounds", 5, "Timing rounds (order alternates).")
flags.DEFINE_integer("steps", 5, "Timed steps per round and framework.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("seq", 256, "Sequence length.")
flags.DEFINE_enum("worker", None, ["lm_jax", "hf_torch"], "Internal: time one framework.")
flags.DEFINE_string(
    "hf_flax_python",
    "",
    "An interpreter with transformers < 5 and its Flax stack: adds HF's FlaxGPT2LMHeadModel "
    "(benchmarks/hf_flax_gpt2_worker.py) to every round.",
)
FLAGS = flags.FLAGS

L, D, N, V = 6, 384, 6, 8192


def train_flops_per_token(T: int) -> float:
    """6 x matmul params (incl. the tied output head) + attention scores 12 L T D."""
    n_matmul = L * 12 * D * D + V * D
    return 6 * n_matmul + 12 * L * T * D


def lm_jax_runner(B, T, train_overrides: dict | None = None, **overrides):
    """Compile and warm the lm_jax step; returns run(n). `overrides`: ModelConfig fields;
    `train_overrides`: TrainConfig fields."""
    cfg = gpt2_style(vocab_size=V, d_model=D, num_layers=L, num_heads=N, max_len=T, scan_unroll=L)
    cfg = dataclasses.replace(cfg, **overrides)
    tcfg = TrainConfig(steps=1000, grad_clip=1.0, **(train_overrides or {}))
    mesh = make_mesh("", devices=jax.devices()[:1])
    tx = make_optimizer(tcfg)
    state, sh = init_train_state(cfg, tx, mesh)
    bsh = batch_sharding(mesh, 2, B)
    step = jit_train_step(cfg, tcfg, tx, sh, bsh)
    batch = random_lm_batch(B, T, V)
    box = {"state": state}

    def run(n):
        s = box["state"]
        for _ in range(n):
            s, m = step(s, batch, jax.random.key(0))
        jax.block_until_ready(m["loss"])
        box["state"] = s

    run(2)  # compile + warm
    return run


def hf_runner(B, T):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=V,
        n_embd=D,
        n_layer=L,
        n_head=N,
        n_positions=T,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    toks = torch.randint(0, V, (B, T + 1))

    def run(n):
        for _ in range(n):
            out = model(toks[:, :-1], labels=toks[:, :-1])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    run(2)
    return run


def run_worker(name: str, B: int, T: int, n: int) -> float:
    """Time `n` steps of one framework in a fresh process; returns tokens/s."""
    sizes = [f"--batch={B}", f"--seq={T}", f"--steps={n}"]
    if name == "hf_flax":
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_flax_gpt2_worker.py")
        cmd = [FLAGS.hf_flax_python, worker, *sizes]
    else:
        cmd = [sys.executable, "-m", "benchmarks.train_throughput", f"--worker={name}", *sizes]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(_):
    B, T, n = FLAGS.batch, FLAGS.seq, FLAGS.steps
    if FLAGS.worker:
        runner = (lm_jax_runner if FLAGS.worker == "lm_jax" else hf_runner)(B, T)
        t = time.perf_counter()
        runner(n)
        print(B * T * n / (time.perf_counter() - t))
        return
    if FLAGS.hf_flax_python and not shutil.which(FLAGS.hf_flax_python):
        raise app.UsageError(
            f"--hf_flax_python={FLAGS.hf_flax_python} is not an executable; create the venv as "
            "in benchmarks/hf_flax_gpt2_worker.py, or drop the flag."
        )
    names = ["lm_jax", "hf_torch"] + (["hf_flax"] if FLAGS.hf_flax_python else [])
    tps = {k: [] for k in names}
    probes = []
    for r in range(FLAGS.rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        probes.append(matmul_peak_flops())
        for name in order:
            tps[name].append(run_worker(name, B, T, n))
        probes.append(matmul_peak_flops())
    peak = max(probes)
    fpt = train_flops_per_token(T)
    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}")
    print(f"matmul probe GFLOP/s: median {median(probes) / 1e9:.1f}, max {peak / 1e9:.1f}")
    for k, v in tps.items():
        print(
            f"{k}: median {median(v):.0f} tokens/s ({', '.join(f'{x:.0f}' for x in v)}); "
            f"{median(v) * fpt / peak * 100:.1f}% of matmul peak"
        )
    for other in names[1:]:
        print(
            f"ratio lm_jax / {other} (median of per-round ratios): "
            f"{median([a / b for a, b in zip(tps['lm_jax'], tps[other])]):.2f}x"
        )


if __name__ == "__main__":
    app.run(main)
