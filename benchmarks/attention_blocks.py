"""Causal attention alone, forward + backward: `causal_block_attention` at several query-block
sizes (0 = one block, the full [T, T] scores), on `train_throughput`'s shapes with a packed
causal mask. Variants alternate per round; median ms per call.

  taskset -c 0 .venv/bin/python -m benchmarks.attention_blocks --rounds=7
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import machine, median, timeit
from lm_jax.nn.attention import make_attention_mask
from lm_jax.nn.softmax_attention import causal_block_attention

flags.DEFINE_list("blocks", ["0", "64", "128"], "Query-block sizes (0 = one block).")
flags.DEFINE_integer("rounds", 7, "Timing rounds.")
flags.DEFINE_integer("calls", 5, "Calls per variant and round.")
FLAGS = flags.FLAGS
B, T, N, H = 8, 256, 6, 64


def main(_):
    q, k, v, w = (
        jax.random.normal(kk, (B, T, N, H)) for kk in jax.random.split(jax.random.key(0), 4)
    )
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    runs = {}
    for b in map(int, FLAGS.blocks):

        def loss(q, k, v, b=b):
            mask = make_attention_mask(pos, pos, seg, seg) & jnp.tril(jnp.ones((T, T), bool))
            return jnp.sum(causal_block_attention(q, k, v, mask, b) * w)

        runs[b] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        jax.block_until_ready(runs[b](q, k, v))
    times = {b: [] for b in runs}
    for r in range(FLAGS.rounds):
        for b in runs if r % 2 == 0 else list(runs)[::-1]:
            f = runs[b]
            times[b].append(timeit(lambda f=f: jax.block_until_ready(f(q, k, v)), FLAGS.calls))
    print(f"machine: {machine()}; [B, T, N, H] = [{B}, {T}, {N}, {H}]")
    for b, t in times.items():
        print(f"attention_q_block={b:<4d} {median(t) * 1e3:7.2f} ms")


if __name__ == "__main__":
    app.run(main)
