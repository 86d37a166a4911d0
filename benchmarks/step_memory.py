"""XLA's compiled memory analysis of one lm_jax train step, on abstract shapes (nothing runs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm_jax.configs.train import TrainConfig
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.state import state_shardings
from lm_jax.train.step import jit_train_step


def memory_of(cfg, batch: int, seq: int, tcfg: TrainConfig | None = None) -> dict:
    """Compiled memory analysis (bytes) of one train step for `cfg` on one device."""
    tcfg = tcfg or TrainConfig(steps=10, grad_clip=1.0)
    tx = make_optimizer(tcfg)
    mesh = make_mesh("", devices=jax.devices()[:1])
    abstract, sh = state_shardings(cfg, tx, mesh)
    bsh = batch_sharding(mesh, 2, batch)
    step = jit_train_step(cfg, tcfg, tx, sh, bsh)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bsh)
    spec = {"inputs": ids, "targets": ids, "positions": ids, "segment_ids": ids}
    spec["loss_mask"] = jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=bsh)
    m = step.lower(abstract, spec, jax.random.key(0)).compile().memory_analysis()
    if m is None:
        raise RuntimeError("this backend gives no compiled memory analysis")
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
    }
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out
