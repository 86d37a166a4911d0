"""Where the time of one lm_jax training step goes, by XLA op kind (jax.profiler trace).

The step is `benchmarks.train_throughput`'s lm_jax step (GPT-2 style, 6 layers, d 384, seq 256,
batch 8, vocab 8192, f32). Op kinds are fusion names with their numeric suffix dropped
(`ynn_fusion` = the YNNPACK matmuls on XLA:CPU); times are summed per step.

  .venv/bin/python -m benchmarks.profile_train_step --steps=3   (profiled after 2 warm-up steps)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
from absl import app, flags

from benchmarks import train_throughput as tt

flags.DEFINE_integer("top", 12, "Op kinds listed.")  # --steps/--batch/--seq: train_throughput's
FLAGS = flags.FLAGS
HOST_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction")


def op_times(trace_dir: str, steps: int) -> collections.Counter:
    """{op kind: ms per step} from the perfetto trace jax.profiler wrote under trace_dir."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    totals = collections.Counter()
    for e in json.load(gzip.open(path))["traceEvents"]:
        if e.get("ph") == "X" and not e["name"].startswith(HOST_EVENTS):
            totals[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0) / 1e3 / steps
    return totals


def main(_):
    B, T = FLAGS.batch, FLAGS.seq
    run = tt.lm_jax_runner(B, T)  # compiles and warms up
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        run(FLAGS.steps)
        jax.profiler.stop_trace()
        times = op_times(d, FLAGS.steps)
    total = sum(times.values())
    matmul = times["ynn_fusion"] + times["dot"]
    rate = tt.train_flops_per_token(T) * B * T / (matmul / 1e3)
    print(f"op time per step {total:.1f} ms; matmuls {matmul:.1f} ms at {rate / 1e9:.0f} GFLOP/s")
    for name, ms in times.most_common(FLAGS.top):
        print(f"{ms:8.1f} ms  {name}")


if __name__ == "__main__":
    app.run(main)
