"""Forward+backward of the dropless block_padded expert MLP alone: fixed-layout fast path vs the
packed layout, with loads that fit R / E rows (balanced) and loads that do not (skewed).

  taskset -c 0 .venv/bin/python -m benchmarks.moe_expert_mlp --rounds=7

N = 1024 tokens, top-2 of 8 SwiGLU experts, D = F = 256, block 128, f32; variants alternate per
round; median ms per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import machine, median, timeit
from lm_jax.nn import moe

flags.DEFINE_integer("rounds", 7, "Timing rounds.")
flags.DEFINE_integer("calls", 10, "Calls per variant and round.")
FLAGS = flags.FLAGS
E, D, F, N, K = 8, 256, 256, 1024, 2


def main(_):
    k = jax.random.split(jax.random.key(0), 5)
    kernels = {
        n: jax.random.normal(kk, (E, F, D) if n == "down" else (E, D, F)) * 0.05
        for n, kk in zip(("gate", "up", "down"), k[:3])
    }
    x = jax.random.normal(k[3], (N, D))
    w, ids = moe.token_choice(jax.random.normal(k[4], (N, E)), K, "softmax_topk")
    routes = {"balanced": ids, "skewed": jnp.where(ids == 1, 0, ids)}  # expert 0 gets 2x its share
    runs = {}
    for name, i in routes.items():
        fits = bool(moe.uses_fast_layout(i.reshape(-1), E, 128))
        for fast in (True, False):

            def loss(x, kern, i=i, fast=fast):
                y = moe.dropless_ffn(
                    x, i, w, kern, jax.nn.silu, E, impl="block_padded", fast_path=fast
                )
                return jnp.sum(y * y)

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            jax.block_until_ready(step(x, kernels))
            runs[f"{name} (loads fit: {fits}), fast_path={fast}"] = step
    times = {v: [] for v in runs}
    for r in range(FLAGS.rounds):
        for v in runs if r % 2 == 0 else list(runs)[::-1]:
            f = runs[v]
            times[v].append(timeit(lambda f=f: jax.block_until_ready(f(x, kernels)), FLAGS.calls))
    print(f"machine: {machine()}")
    for v, t in times.items():
        print(f"{v:45s} {median(t) * 1e3:7.2f} ms")


if __name__ == "__main__":
    app.run(main)
