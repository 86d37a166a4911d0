"""A/B of lm_jax training-step variants in one process, interleaved (`train_throughput`'s config).

Each variant is `;`-separated: `base` (the defaults), `field=value` ModelConfig overrides joined by
`,`, or `autodiff_norms` (LayerNorm/RMSNorm by autodiff, not their hand-written backward passes).

Rounds alternate the order; the report is each variant's median tokens/s and its median per-round
ratio to the first variant.

  .venv/bin/python -m benchmarks.train_step_ab --rounds=7 --steps=3 \
      --variants="base;attention_q_block=0;autodiff_norms"
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import train_throughput as tt
from benchmarks.common import machine, random_lm_batch
from lm_jax.configs import gpt2_style
from lm_jax.configs.train import TrainConfig
from lm_jax.nn import layers
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.state import init_train_state
from lm_jax.train.step import jit_train_step

flags.DEFINE_string(
    "variants", "base;attention_q_block=0;autodiff_norms", "See the docstring."
)  # --rounds, --steps: train_throughput's
FLAGS = flags.FLAGS
B, T = 8, 256


def _autodiff_layer_norm(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _autodiff_rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * scale


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def make_runner(spec: str):
    """Compile and warm the step for one variant; returns run(n) -> seconds for n steps."""
    cfg = gpt2_style(
        vocab_size=tt.V, d_model=tt.D, num_layers=tt.L, num_heads=tt.N, max_len=T, scan_unroll=tt.L
    )
    norms = (layers.layer_norm, layers.rms_norm)
    for item in filter(None, spec.split(",")):
        if item == "autodiff_norms":
            layers.layer_norm, layers.rms_norm = _autodiff_layer_norm, _autodiff_rms_norm
        elif item != "base":
            name, _, value = item.partition("=")
            cfg = dataclasses.replace(cfg, **{name: _parse(value)})
    tcfg = TrainConfig(steps=1000, grad_clip=1.0)
    mesh = make_mesh("", devices=jax.devices()[:1])
    tx = make_optimizer(tcfg)
    state, sh = init_train_state(cfg, tx, mesh)
    step = jit_train_step(cfg, tcfg, tx, sh, batch_sharding(mesh, 2, B))
    batch = random_lm_batch(B, T, tt.V)
    box = {"state": state}

    def run(n: int) -> float:
        s, t0 = box["state"], time.perf_counter()
        for _ in range(n):
            s, m = step(s, batch, jax.random.key(0))
        jax.block_until_ready(m["loss"])
        box["state"] = s
        return time.perf_counter() - t0

    run(2)  # compile (tracing sees the patched norms) and warm up
    layers.layer_norm, layers.rms_norm = norms
    return run


def main(_):
    specs = [s.strip() for s in FLAGS.variants.split(";") if s.strip()]
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
