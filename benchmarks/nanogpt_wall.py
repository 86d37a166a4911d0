"""nanoGPT's CPU recipe side by side: lm_jax (`--preset=nanogpt_cpu`) and nanoGPT's own PyTorch
model and loop (`benchmarks/nanogpt_reference.py`), in alternating rounds on the same machine.

  .venv/bin/python -m benchmarks.nanogpt_wall --rounds=3 --seeds=0,1,2

Each side runs in its own process, one after the other (the order alternates between rounds).
`train s` is the wall time of the 2,000 training steps: for lm_jax the whole loop (first-step
compile, data, the final checkpoint; no periodic evaluation), for nanoGPT its training loop.
Both are then scored on every validation character. Prints one row per run, the medians and
the median of the per-round ratios lm_jax / nanoGPT.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks.common import machine

flags.DEFINE_integer("rounds", 3, "Rounds (each runs both sides once).")
flags.DEFINE_list("seeds", ["0"], "Seeds, one per round (cycled).")
flags.DEFINE_integer("iters", 2000, "Training steps of both sides.")
flags.DEFINE_string("data", "../shared/data/tinyshakespeare/input.txt", "nanoGPT's input.txt.")
flags.DEFINE_string("extra", "", "Extra lm_jax settings, comma-separated: train.prefetch_batches=0")
FLAGS = flags.FLAGS

WORKER = r"""
import json, sys, tempfile, time
from lm_jax.configs.presets import PRESETS
from lm_jax.data import DataConfig
from lm_jax.train import engine
from lm_jax.train.loop import Experiment, PretrainTask

seed, iters, data, extra = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
model, data_kw, train = PRESETS["nanogpt_cpu"]()
data_kw = {**data_kw, "source": f"tinyshakespeare:{data}", "seed": seed}  # as --data.seed=S
tkw = {"steps": iters, "lr_decay_steps": iters, "seed": seed, "eval_every": 0, "save_every": 0,
       "progress_bar": False, "num_samples": 0, "workdir": tempfile.mkdtemp()}
tkw.update({k[6:]: v for k, v in extra.items() if k.startswith("train.")})
exp = Experiment(model, DataConfig(**data_kw), train.replace(**tkw))

class Timed(PretrainTask):
    def final_evaluate(self, state, step):
        return {}

task = Timed(exp, log=lambda _: None)
t0 = time.perf_counter()
res = engine.run(task, exp.train, log=lambda _: None)
wall = time.perf_counter() - t0
val = task.evaluate(res.state, res.step)["eval/loss"]
print("RESULT " + json.dumps({"train_s": wall, "val": val}))
"""


def _extra() -> dict:
    out = {}
    for item in filter(None, FLAGS.extra.split(",")):
        k, _, v = item.partition("=")
        out[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
    return out


def run_lm_jax(seed: int) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with tempfile.TemporaryDirectory():
        r = subprocess.run(
            [sys.executable, "-c", WORKER, str(seed), str(FLAGS.iters), FLAGS.data,
             json.dumps(_extra())],
            capture_output=True, text=True, check=False, env=env,
        )  # fmt: skip
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if r.returncode or not m:
        raise RuntimeError(f"lm_jax run failed:\n{r.stderr[-3000:]}")
    return json.loads(m.group(1))


def run_nanogpt(seed: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.nanogpt_reference", f"--seeds={seed}",
         f"--iters={FLAGS.iters}", f"--data={FLAGS.data}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    m = re.search(rf"^\| {seed} \| [\d.]+ \| ([\d.]+) \| (\d+) \|$", r.stdout, re.M)
    if r.returncode or not m:
        raise RuntimeError(f"nanoGPT run failed:\n{r.stderr[-3000:]}\n{r.stdout[-2000:]}")
    return {"val": float(m.group(1)), "train_s": float(m.group(2))}


def main(_):
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    print("| round | seed | lm_jax train s | nanoGPT train s | ratio | lm_jax val | nanoGPT val |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for r in range(FLAGS.rounds):
        seed = int(FLAGS.seeds[r % len(FLAGS.seeds)])
        if r % 2 == 0:
            a, b = run_lm_jax(seed), run_nanogpt(seed)
        else:
            b, a = run_nanogpt(seed), run_lm_jax(seed)
        ratio = a["train_s"] / b["train_s"]
        rows.append((a, b, ratio))
        print(
            f"| {r} | {seed} | {a['train_s']:.1f} | {b['train_s']:.0f} | {ratio:.3f} | "
            f"{a['val']:.4f} | {b['val']:.4f} |",
            flush=True,
        )
    med = statistics.median
    print(
        f"medians: lm_jax {med([a['train_s'] for a, _, _ in rows]):.1f} s, nanoGPT "
        f"{med([b['train_s'] for _, b, _ in rows]):.0f} s, ratio {med([x for *_, x in rows]):.3f}"
        f"; load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    app.run(main)
