"""A/B of lm_jax training-step variants in one process, interleaved (`train_throughput`'s config).

Each variant is `;`-separated: `base` (the defaults), `field=value` ModelConfig or
`train.field=value` TrainConfig overrides joined by `,`, or `autodiff_norms` (LayerNorm/RMSNorm
by autodiff, not their hand-written backward passes).

Rounds alternate the order; the report is each variant's median tokens/s and its median per-round
ratio to the first variant.

  .venv/bin/python -m benchmarks.train_step_ab --rounds=7 --steps=3 \
      --variants="base;attention_q_block=0;autodiff_norms"
  .venv/bin/python -m benchmarks.train_step_ab --rounds=7 --steps=3 \
      --variants="base;train.loss_chunk=64;train.loss_chunk=128"
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import app, flags

from benchmarks import train_throughput as tt
from benchmarks.common import machine
from lm_jax.configs.base import ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.nn import layers

flags.DEFINE_string(
    "variants", "base;attention_q_block=0;autodiff_norms", "See the docstring."
)  # --rounds, --steps: train_throughput's
FLAGS = flags.FLAGS
B, T = 8, 256
FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def parse_variant(spec: str) -> tuple[dict, dict, bool]:
    """'attention_q_block=0,train.loss_chunk=64,autodiff_norms'
    -> ({'attention_q_block': 0}, {'loss_chunk': 64}, True)."""
    overrides, train_overrides, autodiff = {}, {}, False
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, eq, value = item.partition("=")
        if item == "autodiff_norms":
            autodiff = True
        elif eq and name in FIELDS:
            overrides[name] = _parse(value)
        elif eq and name.startswith("train.") and name[6:] in TRAIN_FIELDS:
            train_overrides[name[6:]] = _parse(value)
        elif item != "base":
            raise app.UsageError(
                f"variant item {item!r}: use base, autodiff_norms, FIELD=VALUE with a "
                f"ModelConfig field ({', '.join(sorted(FIELDS))}) or train.FIELD=VALUE with a "
                "TrainConfig field."
            )
    return overrides, train_overrides, autodiff


def make_runner(spec: str):
    """Compile and warm the step for one variant; returns run(n) -> seconds for n steps."""
    overrides, train_overrides, autodiff = parse_variant(spec)
    norms = (layers.layer_norm, layers.rms_norm)
    if autodiff:  # patched while the step is traced (the runner compiles it), restored after
        layers.layer_norm, layers.rms_norm = layers.layer_norm_autodiff, layers.rms_norm_autodiff
    try:
        run = tt.lm_jax_runner(B, T, train_overrides, **overrides)
    finally:
        layers.layer_norm, layers.rms_norm = norms

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        run(n)
        return time.perf_counter() - t0

    return timed


def main(_):
    specs = [s.strip() for s in FLAGS.variants.split(";") if s.strip()]
    for s in specs:
        parse_variant(s)  # bad variants fail before any compile
    runners = {s: make_runner(s) for s in specs}
    tps = {s: [] for s in specs}
    for r in range(FLAGS.rounds):
        for s in specs if r % 2 == 0 else specs[::-1]:
            tps[s].append(FLAGS.steps * B * T / runners[s](FLAGS.steps))
    print(f"machine: {machine()}; {FLAGS.rounds} rounds x {FLAGS.steps} steps")
    first = np.asarray(tps[specs[0]])
    for s in specs:
        ratio = float(np.median(np.asarray(tps[s]) / first))
        print(f"{s}: median {np.median(tps[s]):.0f} tokens/s, x{ratio:.3f} vs {specs[0]}")


if __name__ == "__main__":
    app.run(main)
