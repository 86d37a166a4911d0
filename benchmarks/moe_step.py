"""MoE vs dense training-step time at equal active FLOPs (issue 4).

`.venv/bin/python -m benchmarks.moe_step --rounds=3 --steps=3`

Dense: SwiGLU MLP with F = top_k * F_expert. MoE: E experts of F_expert, top-k token choice, so
the active expert FLOPs per token equal the dense MLP's (the router adds D * E). Both run the
full train step (`jit_train_step`: forward, backward, AdamW) on one device; variants alternate
order per round and the median step time is reported with tokens/s and the ratio to dense.
Dropless runs with both grouped matmuls (`MoEConfig.grouped_matmul`: ragged_dot, block_padded).
"""

from __future__ import annotations

import jax
from absl import app, flags

from benchmarks.common import machine, median, random_lm_batch, timeit
from lm_jax.configs import MoEConfig, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.state import init_train_state
from lm_jax.train.step import jit_train_step

flags.DEFINE_integer("rounds", 3, "Timing rounds (order alternates).")
flags.DEFINE_integer("steps", 3, "Timed steps per variant and round.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("seq", 128, "Sequence length.")
flags.DEFINE_integer("experts", 8, "Number of experts E.")
flags.DEFINE_integer("top_k", 2, "Experts per token.")
flags.DEFINE_list("blocks", ["128"], "Row-block sizes timed for the block_padded grouped matmul.")
flags.register_validator(
    "blocks", lambda v: all(b.isdigit() and int(b) > 0 for b in v), "--blocks: positive integers."
)
flags.DEFINE_bool("no_fast", True, "Also time block_padded with its fixed-layout fast path off.")
FLAGS = flags.FLAGS

L, D, N, V, F_EXPERT = 4, 256, 4, 4096, 256


def make_cfg(variant: str):
    kw = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=N, max_len=FLAGS.seq)
    kw.update(scan_unroll=L)
    if variant == "dense":
        return llama_style(mlp_dim=FLAGS.top_k * F_EXPERT, **kw)
    dispatch, _, gmm = variant.partition(":")  # e.g. dropless:block_padded@64, ...@64/nofast
    gmm, _, block = gmm.partition("@")
    block, _, nofast = block.partition("/")
    moe = MoEConfig(
        num_experts=FLAGS.experts,
        top_k=FLAGS.top_k,
        dispatch=dispatch,
        grouped_matmul=gmm or "auto",
        grouped_matmul_block=int(block or 128),
        dropless_fast_path=not nofast,
    )
    return llama_style(mlp_dim=F_EXPERT, moe=moe, **kw)


def runner(variant: str):
    cfg, B, T = make_cfg(variant), FLAGS.batch, FLAGS.seq
    tcfg = TrainConfig(steps=1000, grad_clip=1.0)
    mesh = make_mesh("", devices=jax.devices()[:1])
    tx = make_optimizer(tcfg)
    state, sh = init_train_state(cfg, tx, mesh)
    step = jit_train_step(cfg, tcfg, tx, sh, batch_sharding(mesh, 2, B))
    batch = random_lm_batch(B, T, V)
    box = {"state": state, "fast": []}

    def run():
        s = box["state"]
        for _ in range(FLAGS.steps):
            s, m = step(s, batch, jax.random.key(0))
        jax.block_until_ready(m["loss"])
        box["state"] = s
        if "moe/dropless_fast_path" in m:
            box["fast"].append(float(m["moe/dropless_fast_path"]))

    run()  # compile + warm
    run.fast = box["fast"]
    return run


def main(_):
    padded = [f"dropless:block_padded@{b}" for b in FLAGS.blocks]
    if FLAGS.no_fast:
        padded += [f"dropless:block_padded@{b}/nofast" for b in FLAGS.blocks]
    variants = ["dense", "dropless:ragged_dot", *padded, "capacity"]
    runs = {v: runner(v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(FLAGS.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            times[v].append(timeit(runs[v], 1) / FLAGS.steps)
    print(f"machine: {machine()}; B={FLAGS.batch} T={FLAGS.seq} L={L} D={D} E={FLAGS.experts}")
    dense = median(times["dense"])
    for v in variants:
        t = median(times[v])
        tok_s = FLAGS.batch * FLAGS.seq / t
        print(f"{v:34s} step {t * 1e3:8.1f} ms  {tok_s:8.0f} tokens/s", end="")
        print(f"  ratio to dense {t / dense:5.2f}x", end="")
        fast = runs[v].fast
        print(f"  fast path in {sum(fast) / len(fast):.0%} of layer-steps" if fast else "")


if __name__ == "__main__":
    app.run(main)
