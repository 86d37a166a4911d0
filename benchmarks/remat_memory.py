"""Remat memory demo (issue 11, item 3): a train step that exceeds a memory budget without
rematerialisation and fits with it, shown with XLA's compiled memory analysis.

  .venv/bin/python -m benchmarks.remat_memory --budget_gib=4

Nothing is allocated or run: the full train step (`jit_train_step`: forward, backward, AdamW)
is lowered on abstract shapes and compiled for one device, once per `ModelConfig.remat` policy
("none", "dots" = save matmul outputs, "full" = save only layer inputs), and
`compile().memory_analysis()` gives the bytes of arguments, outputs and temporaries. Peak ~=
arguments + outputs + temporaries - aliased (donated) bytes. Activations for the backward pass
live in the temporaries, so remat shrinks them. Defaults: Llama style, 8 layers, d 512, 8 heads,
seq 1024, batch 8, vocab 8192, f32.
"""

from __future__ import annotations

import json

from absl import app, flags

from benchmarks.step_memory import memory_of
from lm_jax.configs import llama_style

flags.DEFINE_float("budget_gib", 4.0, "Per-device memory budget (GiB) the step must fit in.")
flags.DEFINE_integer("layers", 8, "Layers L.")
flags.DEFINE_integer("d_model", 512, "Width D.")
flags.DEFINE_integer("seq", 1024, "Sequence length T.")
flags.DEFINE_integer("batch", 8, "Batch size B.")
flags.DEFINE_integer("vocab", 8192, "Vocabulary V.")
flags.DEFINE_list("policies", ["none", "dots", "full"], "ModelConfig.remat policies to compile.")
FLAGS = flags.FLAGS


def main(_):
    base = llama_style(
        vocab_size=FLAGS.vocab, d_model=FLAGS.d_model, num_layers=FLAGS.layers,
        num_heads=8, max_len=FLAGS.seq,
    )  # fmt: skip
    budget = FLAGS.budget_gib * 2**30
    gib = 1 / 2**30
    print(
        f"Llama style L={FLAGS.layers} D={FLAGS.d_model} T={FLAGS.seq} B={FLAGS.batch} "
        f"V={FLAGS.vocab} f32, train step (fwd+bwd+AdamW); budget {FLAGS.budget_gib:.2f} GiB"
    )
    print("| remat | arguments GiB | outputs GiB | temporaries GiB | peak GiB | fits budget |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for policy in FLAGS.policies:
        m = memory_of(base.replace(remat=policy), FLAGS.batch, FLAGS.seq)
        rows[policy] = m
        print(
            f"| {policy} | {m['arguments'] * gib:.3f} | {m['outputs'] * gib:.3f} | "
            f"{m['temporaries'] * gib:.3f} | {m['peak'] * gib:.3f} | "
            f"{'yes' if m['peak'] <= budget else 'NO'} |",
            flush=True,
        )
    print("RESULT_JSON " + json.dumps(rows))


if __name__ == "__main__":
    app.run(main)
