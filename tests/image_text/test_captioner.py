"""Prefix captioner: the decoder's params are a Transformer's; cached decoding = full forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.transformer import Transformer
from lm_jax.nn.two_towers import Captioner, CaptionerConfig, PrefixLM, generate_with_prefix
from lm_jax.nn.vision import VisionConfig, ViT

BLK = dict(d_model=16, num_layers=2, num_heads=2, norm="layernorm", activation="gelu_tanh",
           gated_mlp=False, use_bias=True, position="learned")  # fmt: skip
VISION = VisionConfig(ModelConfig(vocab_size=1, max_len=1, **BLK), 16, 8, 1)
CFG = CaptionerConfig(VISION, ModelConfig(vocab_size=11, max_len=16, **BLK))


def test_prefix_lm_is_a_transformer():
    toks = jnp.array([[1, 4, 5, 6]], jnp.int32)
    p = nn.unbox(PrefixLM(CFG.decoder).init(jax.random.key(0), toks)["params"])
    t = Transformer(CFG.decoder).init(jax.random.key(0), toks)["params"]
    assert jax.tree.structure(p) == jax.tree.structure(nn.unbox(t))
    np.testing.assert_allclose(
        PrefixLM(CFG.decoder).apply({"params": p}, toks),
        Transformer(CFG.decoder).apply({"params": p}, toks),
        atol=1e-6,
    )


def test_cached_greedy_decode_matches_full_forward():
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), minval=-1, maxval=1)
    m = Captioner(CFG)
    params = nn.unbox(m.init(jax.random.key(2), images, jnp.ones((2, 3), jnp.int32))["params"])
    # sharpen the LM so greedy choices are not near-ties
    params["lm"]["embed_tokens"]["embedding"] = params["lm"]["embed_tokens"]["embedding"] * 50
    out = generate_with_prefix(CFG, params, images, bos_id=1, eos_id=2, max_new_tokens=8)
    seq = jnp.ones((2, 1), jnp.int32)
    for _ in range(8):  # no cache: full forward each step
        nxt = jnp.argmax(m.apply({"params": params}, images, seq)[:, -1], -1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(jnp.int32)], 1)
    for b in range(2):
        n = int(out.lengths[b])
        np.testing.assert_array_equal(np.asarray(out.tokens[b, :n]), np.asarray(seq[b, 1 : 1 + n]))


def test_vit_variants():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    for kw in (dict(position="sincos", pooling="map"), dict(pooling="mean", patch_bias=True)):
        cfg = VisionConfig(VISION.encoder, 16, 8, 1, **kw)
        v = ViT(cfg).init(jax.random.key(0), x)
        pooled, tokens = ViT(cfg).apply(v, x)
        assert pooled.shape == (2, 16) and tokens.shape == (2, cfg.num_tokens, 16)
        assert np.isfinite(np.asarray(pooled)).all()
    # bidirectional: the first patch's output depends on the last patch
    cfg = VisionConfig(VISION.encoder, 16, 8, 1, pooling="mean")
    v = ViT(cfg).init(jax.random.key(0), x)
    _, a = ViT(cfg).apply(v, x)
    _, b = ViT(cfg).apply(v, x.at[:, 8:, 8:].add(1.0))
    assert float(jnp.max(jnp.abs(a[:, 0] - b[:, 0]))) > 1e-4
