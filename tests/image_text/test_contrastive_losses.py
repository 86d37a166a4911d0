"""Contrastive losses: global batch on 8 devices == one device (forward and gradients);
invariants (identity pairing is the minimum, CLIP's temperature clip)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm_jax.configs.base import ModelConfig
from lm_jax.losses_contrastive import (
    clip_loss,
    sharded_contrastive_loss,
    sigmoid_loss,
)
from lm_jax.nn.two_towers import TextConfig, TwoTowerConfig, TwoTowers
from lm_jax.nn.vision import VisionConfig
from lm_jax.sharding import make_mesh, replicated
from lm_jax.train import image_text as it

B, E = 16, 8


def _emb(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (B, E))
    txt = img + 0.8 * jax.random.normal(k2, (B, E))
    n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return n(img), n(txt)


def _loss(kind):
    if kind == "clip":
        return lambda i, t, s, b: clip_loss(i, t, s)
    return sigmoid_loss


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_global_batch_equals_single_device(kind):
    assert jax.device_count() == 8
    img, txt = _emb(0)
    s, b = jnp.float32(7.0), jnp.float32(-3.0)
    vg = jax.value_and_grad(_loss(kind), argnums=(0, 1, 2, 3))
    one = jax.jit(vg)
    ref_l, ref_g = one(*jax.device_put((img, txt, s, b), jax.devices()[0]))

    mesh = make_mesh("data:8")
    sh = NamedSharding(mesh, P("data"))
    args = (jax.device_put(img, sh), jax.device_put(txt, sh), s, b)
    # 1) jit with batch-sharded inputs: XLA gathers the global batch.
    l1, g1 = jax.jit(vg, in_shardings=(sh, sh, replicated(mesh), replicated(mesh)))(*args)
    # 2) shard_map exchange: SigLIP's chunked ring (ppermute) / CLIP's all-gather.
    sm = jax.jit(jax.value_and_grad(sharded_contrastive_loss(mesh, kind), argnums=(0, 1, 2, 3)))
    l2, g2 = sm(*args)
    assert len(g1[0].sharding.device_set) == 8
    for lv, gv in ((l1, g1), (l2, g2)):
        np.testing.assert_allclose(lv, ref_l, rtol=1e-6, atol=1e-6)
        for a, r in zip(gv, ref_g):
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    d1, d2 = abs(float(l1) - float(ref_l)), abs(float(l2) - float(ref_l))
    print(f"{kind}: loss {float(ref_l):.6f}; |jit-sharded - 1 dev| {d1:.1e}, |shard_map| {d2:.1e}")


def _tiny_cfg(loss="clip"):
    blk = dict(d_model=16, num_layers=1, num_heads=2, norm="layernorm", activation="gelu_tanh",
               gated_mlp=False, use_bias=True, position="learned")  # fmt: skip
    vision = VisionConfig(ModelConfig(vocab_size=1, max_len=1, **blk), 16, 8, 1)
    text = TextConfig(ModelConfig(vocab_size=20, max_len=8, **blk), True, "eos", 2)
    return TwoTowerConfig(vision, text, embed_dim=8, loss=loss)


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 20, size=(n, 8)).astype(np.int32)
    lengths = rng.integers(2, 9, size=n)
    mask = np.arange(8)[None] < lengths[:, None]
    tokens[np.arange(n), lengths - 1] = 2
    tokens[~mask] = 0
    image = rng.integers(0, 256, size=(n, 16, 16, 1)).astype(np.uint8)
    return {"image": image, "tokens": tokens, "mask": mask}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_tower_loss_and_grads_sharded_equal_single_device(loss):
    cfg = _tiny_cfg(loss)
    batch = _batch()
    tx = optax.sgd(0.1)
    fn = lambda p, b: it.contrastive_loss_fn(p, b, cfg)  # noqa: E731
    one_mesh = make_mesh("data:1", jax.devices()[:1])
    s1, _ = it.init_state(cfg, tx, one_mesh)
    with jax.set_mesh(one_mesh):
        (l1, _), g1 = jax.jit(jax.value_and_grad(fn, has_aux=True))(s1.params, batch)
    mesh = make_mesh("data:8")
    s8, sh = it.init_state(cfg, tx, mesh)
    bsh = {k: it.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        f8 = jax.jit(jax.value_and_grad(fn, has_aux=True), in_shardings=(sh.params, bsh))
        (l8, _), g8 = f8(s8.params, batch)
    leaves = zip(jax.tree.leaves(g1), jax.tree.leaves(g8))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in leaves)
    print(f"{loss}: loss 1 dev {float(l1):.6f} 8 dev {float(l8):.6f}; max|grad diff| {diff:.1e}")
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert diff < 5e-5  # f32 reduction order differs across 8 shards


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_identity_pairing_is_minimal(kind):
    img, txt = _emb(1)
    f = _loss(kind)
    s, b = 10.0, -5.0
    base = float(f(img, txt, s, b))
    rng = np.random.default_rng(0)
    for _ in range(20):
        perm = rng.permutation(B)
        if (perm == np.arange(B)).all():
            continue
        assert float(f(img, txt[perm], s, b)) > base
    # perfectly aligned unit vectors with a growing scale: the loss goes to 0
    eye = jnp.eye(B, E * 2)
    assert float(f(eye, eye, 100.0, -50.0 if kind == "siglip" else 0.0)) < 1e-6


def test_temperature_clipped_as_clip():
    cfg = _tiny_cfg()
    batch = _batch(4)
    state, sh = it.init_state(cfg, optax.sgd(1e3), make_mesh("data:1", jax.devices()[:1]))
    assert np.isclose(float(state.params["logit_scale"]), math.log(1 / 0.07))
    params = dict(state.params, logit_scale=jnp.float32(10.0))  # exp(10) >> 100
    m = TwoTowers(cfg)
    out = m.apply({"params": params}, it.to_unit(batch["image"]), batch["tokens"], batch["mask"])
    assert float(out["logit_scale"]) == pytest.approx(100.0)
    g = jax.grad(lambda p: it.contrastive_loss_fn(p, batch, cfg)[0])(params)
    assert float(g["logit_scale"]) == 0.0
    # a huge step on the temperature is clamped back to log(100) by the train step
    step = jax.jit(lambda s, b: it.train_step(s, b, jax.random.key(0), cfg=cfg, tx=optax.sgd(1e3)))
    grads_push = state.replace(params=dict(state.params, logit_scale=jnp.float32(4.6)))
    new, _ = step(grads_push, batch)
    assert float(new.params["logit_scale"]) <= math.log(100) + 1e-6
