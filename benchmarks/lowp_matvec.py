"""Low-precision weights on XLA:CPU: is a bf16 or int8 weight matrix read faster than f32?

Batch-1 decode is a chain of matrix-vector products whose time is the weight bytes read, so
halving (bf16) or quartering (int8, per-column scales) the bytes could only pay if XLA:CPU
reads them at the f32 path's bandwidth. One x [1, K] @ W [K, N] (default 4096 x 16384, 256 MB
in f32), jitted, in each form:

  f32          x @ W
  bf16         dot(bf16 x, bf16 W) accumulated in f32
  bf16 -> f32  x @ W.astype(f32) (dequantised inside the program)
  int8 -> f32  (x @ W.astype(f32)) * scale
  int8 x int8  dot(int8 x, int8 W) accumulated in int32 (dynamic activation quantisation)

Median ms of `--reps` calls per round, rounds in alternating order; the effective bandwidth is
the bytes of W over that time. The matmul probe is printed beside each round.

  .venv/bin/python -m benchmarks.lowp_matvec --rounds=3
"""

from __future__ import annotations

import datetime
import json
import time

import numpy as np
from absl import app, flags

from benchmarks.common import machine, matmul_peak_flops, median

flags.DEFINE_integer("rounds", 3, "Rounds (order alternates).")
flags.DEFINE_integer("reps", 20, "Calls per round and form.")
flags.DEFINE_integer("k", 4096, "Rows of W.")
flags.DEFINE_integer("n", 16384, "Columns of W.")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import jax.numpy as jnp

    K, N = FLAGS.k, FLAGS.n
    x = jnp.ones((1, K), jnp.float32)
    w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0
    w8 = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    forms = {
        "f32": (jax.jit(lambda x, w: x @ w), (x, w), 4),
        "bf16": (jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w,
                                              preferred_element_type=jnp.float32)),
                 (x, w.astype(jnp.bfloat16)), 2),  # fmt: skip
        "bf16 -> f32": (jax.jit(lambda x, w: x @ w.astype(jnp.float32)),
                        (x, w.astype(jnp.bfloat16)), 2),  # fmt: skip
        "int8 -> f32": (jax.jit(lambda x, w, s: (x @ w.astype(jnp.float32)) * s),
                        (x, w8, scale), 1),  # fmt: skip
        "int8 x int8": (jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.int32)),
                        (jnp.ones((1, K), jnp.int8), w8), 1),  # fmt: skip
    }
    for fn, args, _ in forms.values():
        fn(*args).block_until_ready()  # compile
    ms = {k: [] for k in forms}
    probes = []
    for r in range(FLAGS.rounds):
        probes.append(round(matmul_peak_flops() / 1e9, 1))
        for name in forms if r % 2 == 0 else list(forms)[::-1]:
            fn, args, _ = forms[name]
            ts = []
            for _ in range(FLAGS.reps):
                t = time.perf_counter()
                fn(*args).block_until_ready()
                ts.append(time.perf_counter() - t)
            ms[name].append(float(np.median(ts)) * 1e3)
    out = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "shape": [K, N], "jax": jax.__version__,
        "ms": {k: round(median(v), 2) for k, v in ms.items()},
        "rounds_ms": {k: [round(x, 2) for x in v] for k, v in ms.items()},
        "gb_per_s": {k: round(K * N * forms[k][2] / (median(v) / 1e3) / 1e9, 2)
                     for k, v in ms.items()},  # fmt: skip
        "time_vs_f32": {k: round(median(v) / median(ms["f32"]), 2) for k, v in ms.items()},
        "matmul_gflops": probes,
    }  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
