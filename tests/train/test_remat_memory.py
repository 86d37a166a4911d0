"""Remat shrinks the compiled train step's temporaries (issue 11, item 3): a budget that the
step without remat exceeds is met with remat (XLA's compiled memory analysis, nothing runs)."""

import jax
import jax.numpy as jnp

from lm_jax.configs import llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.state import state_shardings
from lm_jax.train.step import jit_train_step


def _temp_bytes(cfg, B, T):
    tcfg = TrainConfig(steps=10)
    tx = make_optimizer(tcfg)
    mesh = make_mesh("", devices=jax.devices()[:1])
    abstract, sh = state_shardings(cfg, tx, mesh)
    bsh = batch_sharding(mesh, 2, B)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bsh)
    batch = {"inputs": ids, "targets": ids, "positions": ids, "segment_ids": ids}
    batch["loss_mask"] = jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=bsh)
    step = jit_train_step(cfg, tcfg, tx, sh, bsh)
    compiled = step.lower(abstract, batch, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_fits_a_budget_that_no_remat_exceeds():
    cfg = llama_style(vocab_size=256, d_model=64, num_layers=4, num_heads=4, max_len=256)
    temps = {r: _temp_bytes(cfg.replace(remat=r), 4, 256) for r in ("none", "dots", "full")}
    budget = temps["none"] // 2
    assert temps["none"] > budget
    assert temps["full"] <= budget, temps
    assert temps["full"] <= temps["dots"] < temps["none"], temps
