"""Train state, initialised already sharded: eval_shape -> logical specs -> jit(out_shardings)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.transformer import Transformer, abstract_params
from lm_jax.sharding import params_shardings


@flax.struct.dataclass
class TrainState:
    """step, params, optimizer state and the count of skipped (non-finite) steps."""

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array


def _by_path(tree) -> dict[tuple, Any]:
    return {tuple(str(k) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def opt_state_shardings(abstract_opt_state, params_abstract, params_sh, mesh: Mesh):
    """An optimizer-state leaf whose path ends with a parameter's path (and has its shape) is
    sharded like that parameter (Adam's mu/nu); anything else (counts) is replicated."""
    shapes = _by_path(params_abstract)
    shards = _by_path(params_sh)

    def one(path, leaf):
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            suffix = keys[i:]
            if suffix in shapes and shapes[suffix].shape == getattr(leaf, "shape", None):
                return shards[suffix]
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
    """(abstract unboxed TrainState, TrainState of NamedShardings)."""
    boxed = abstract_params(cfg)
    p_sh = params_shardings(boxed, mesh)
    params = nn.unbox(boxed)
    opt = jax.eval_shape(tx.init, params)
    o_sh = opt_state_shardings(opt, params, p_sh, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=opt,
        skipped=jax.ShapeDtypeStruct((), jnp.int32),
    )
    return abstract, TrainState(step=rep, params=p_sh, opt_state=o_sh, skipped=rep)


def init_train_state(
    cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int = 0, params=None
) -> tuple[TrainState, TrainState]:
    """Initialise (or wrap given `params`) directly into their shardings; never on one host."""
    _, shardings = state_shardings(cfg, tx, mesh)
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)

    def init(rng, given):
        p = given if given is not None else nn.unbox(Transformer(cfg).init(rng, tokens)["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=p,
            opt_state=tx.init(p),
            skipped=jnp.zeros((), jnp.int32),
        )

    if params is not None:
        params = jax.device_put(params, shardings.params)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed), params)
    return state, shardings
