"""Memory of a train step with the LM head + loss in chunks (`TrainConfig.loss_chunk`).

  .venv/bin/python -m benchmarks.loss_chunk --chunks=0,512,128

Nothing runs: the full train step (forward, backward, AdamW) is lowered on abstract shapes and
compiled for one device per chunk size, and XLA's `memory_analysis` gives argument, output and
temporary bytes (`benchmarks.step_memory.memory_of`). Default model: SmolLM2-135M's shape
(30 layers, d 576, 9 heads / 3 KV heads, SwiGLU 1536, vocab 49152, tied), full remat, f32,
batch 8 x 2048 tokens: its unchunked logits alone are 8 * 2048 * 49152 * 4 B = 3 GiB.
Step time on the CPU config of `train_throughput` is `train_step_ab` with
`--variants="base;train.loss_chunk=64;train.loss_chunk=128"`.
"""

from __future__ import annotations

import json

from absl import app, flags

from benchmarks.common import machine
from benchmarks.step_memory import memory_of
from lm_jax.configs import llama_style
from lm_jax.configs.train import TrainConfig

flags.DEFINE_list("chunks", ["0", "512", "128"], "TrainConfig.loss_chunk values (0 = none).")
flags.DEFINE_integer("seq", 2048, "Sequence length T.")
flags.DEFINE_integer("batch", 8, "Batch size B.")
flags.DEFINE_enum("remat", "full", ["none", "dots", "full"], "ModelConfig.remat.")
FLAGS = flags.FLAGS


def smollm2_135m_shape(seq: int, remat: str):
    return llama_style(
        vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
        mlp_dim=1536, max_len=seq, rope_theta=100000.0, tie_embeddings=True, remat=remat,
    )  # fmt: skip


def main(_):
    cfg = smollm2_135m_shape(FLAGS.seq, FLAGS.remat)
    gib = 1 / 2**30
    logits = FLAGS.batch * FLAGS.seq * cfg.vocab_size * 4
    print(
        f"machine: {machine()}; SmolLM2-135M shape, B={FLAGS.batch} T={FLAGS.seq} "
        f"remat={FLAGS.remat} f32; one [B, T, V] f32 logits array = {logits * gib:.2f} GiB"
    )
    print("| loss_chunk | arguments GiB | temporaries GiB | peak GiB | peak vs unchunked |")
    print("|---|---|---|---|---|")
    rows = {}
    for c in (int(x) for x in FLAGS.chunks):
        m = memory_of(cfg, FLAGS.batch, FLAGS.seq, TrainConfig(steps=10, loss_chunk=c))
        rows[c] = m
        ref = rows.get(0, m)["peak"]
        print(
            f"| {c or 'none'} | {m['arguments'] * gib:.2f} | {m['temporaries'] * gib:.2f} | "
            f"{m['peak'] * gib:.2f} | {m['peak'] / ref:.2f}x |",
            flush=True,
        )
    print("RESULT_JSON " + json.dumps(rows))


if __name__ == "__main__":
    app.run(main)
