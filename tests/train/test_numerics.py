"""Non-finite policy and mixed-precision numerics of the train step."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.losses import cross_entropy
from lm_jax.nn import Transformer
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.state import init_train_state
from lm_jax.train.step import jit_train_step

MODEL = llama_style(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32
)


def batch(seed=0, B=4, T=16):
    toks = np.random.default_rng(seed).integers(0, MODEL.vocab_size, (B, T + 1)).astype(np.int32)
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": np.ones((B, T), np.float32),
    }


def test_skip_policy_leaves_state_unchanged_to_the_bit_and_counts():
    tcfg = TrainConfig(nonfinite="skip")
    mesh = make_mesh("", devices=jax.devices()[:1])
    tx = make_optimizer(tcfg)
    state, sh = init_train_state(MODEL, tx, mesh)
    bsh = batch_sharding(mesh, 2, 4)
    good = jit_train_step(MODEL, tcfg, tx, sh, bsh)
    bad = jit_train_step(MODEL, tcfg, tx, sh, bsh, inject_nonfinite=True)
    state, _ = good(state, batch(0), jax.random.key(0))
    before = jax.device_get((state.params, state.opt_state))
    state, m = bad(state, batch(1), jax.random.key(0))
    assert not bool(m["finite"]) and int(state.skipped) == 1 and int(state.step) == 2
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    state, m = good(state, batch(2), jax.random.key(0))
    assert bool(m["finite"]) and int(state.skipped) == 1


def _primitive_dtypes(jaxpr, names, out):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            out.append((eqn.primitive.name, eqn.outvars[0].aval.dtype))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitive_dtypes(sub, names, out)
    return out


def test_softmax_norms_and_loss_run_in_float32_under_bfloat16():
    cfg = MODEL.replace(dtype="bfloat16")
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens))["params"]

    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, tokens)
        return cross_entropy(logits, tokens)[0]

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), __import__("flax").linen.unbox(params))
    ).jaxpr
    found = _primitive_dtypes(jaxpr, {"exp", "rsqrt", "log", "reduce_max"}, [])
    assert {n for n, _ in found} >= {"exp", "rsqrt", "log"}
    assert all(d == jnp.float32 for _, d in found), found
    dots = _primitive_dtypes(jaxpr, {"dot_general"}, [])
    assert any(d == jnp.bfloat16 for _, d in dots)  # the matmuls do run in bf16


@pytest.mark.slow
def test_bf16_training_tracks_f32():
    tcfg = TrainConfig(learning_rate=3e-3, warmup_steps=5, steps=50)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = MODEL.replace(dtype=dtype)
        mesh = make_mesh("", devices=jax.devices()[:1])
        tx = make_optimizer(tcfg)
        state, sh = init_train_state(cfg, tx, mesh)
        step = jit_train_step(cfg, tcfg, tx, sh, batch_sharding(mesh, 2, 4))
        out = []
        for i in range(50):
            state, m = step(state, batch(i % 4), jax.random.key(0))
            out.append(float(m["loss"]))
        losses[dtype] = np.array(out)
    assert losses["float32"][-1] < losses["float32"][0] - 0.5
    # tolerance of the reliability issue: 50-step bf16 loss within 2% of f32
    np.testing.assert_allclose(losses["bfloat16"][-10:], losses["float32"][-10:], rtol=0.02)
