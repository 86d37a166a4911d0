"""Prefix captioner: the decoder's params are a Transformer's; cached decoding = full forward;
captions (greedy and sampled) equal those of the captioner's former own decode loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs.base import ModelConfig
from lm_jax.generate import generate_with_prefix
from lm_jax.nn.transformer import Transformer
from lm_jax.nn.two_towers import Captioner, CaptionerConfig
from lm_jax.nn.vision import VisionConfig, ViT

BLK = dict(d_model=16, num_layers=2, num_heads=2, norm="layernorm", activation="gelu_tanh",
           gated_mlp=False, use_bias=True, position="learned")  # fmt: skip
VISION = VisionConfig(ModelConfig(vocab_size=1, max_len=1, **BLK), 16, 8, 1)
CFG = CaptionerConfig(VISION, ModelConfig(vocab_size=11, max_len=16, **BLK))
SHARP = CaptionerConfig(VISION, CFG.decoder.replace(tie_embeddings=False))


def test_captioner_decoder_is_a_transformer():
    """The decoder's params are a plain `Transformer`'s; the captioner's logits are the
    Transformer's with the projected image tokens as `prefix_embeds`."""
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), minval=-1, maxval=1)
    toks = jnp.array([[1, 4, 5], [1, 6, 7]], jnp.int32)
    m = Captioner(CFG)
    params = nn.unbox(m.init(jax.random.key(2), images, toks)["params"])
    t = Transformer(CFG.decoder).init(jax.random.key(0), toks)["params"]
    assert jax.tree.structure(params["lm"]) == jax.tree.structure(nn.unbox(t))
    prefix = m.apply({"params": params}, images, method=Captioner.prefix)
    assert prefix.shape == (2, CFG.num_prefix, 16)
    full = Transformer(CFG.decoder).apply({"params": params["lm"]}, toks, prefix_embeds=prefix)
    assert full.shape == (2, CFG.num_prefix + 3, 11)
    np.testing.assert_allclose(
        m.apply({"params": params}, images, toks), full[:, CFG.num_prefix :], atol=1e-6
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


def _sharp_model():
    """A fixed random captioner whose captions depend on the image, with sharp (tie-free)
    logits; `embed_positions` is drawn here so the fixture does not depend on its init."""
    scale = jnp.array([0.2, 1.0, 3.0])[:, None, None, None]
    images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1), minval=-1, maxval=1) * scale
    toks = jnp.ones((3, 3), jnp.int32)
    params = nn.unbox(Captioner(SHARP).init(jax.random.key(2), images, toks)["params"])
    lm = params["lm"]
    lm["lm_head"]["kernel"] = lm["lm_head"]["kernel"] * 8
    lm["embed_tokens"]["embedding"] = lm["embed_tokens"]["embedding"] * 5
    params["projector_out"]["kernel"] = params["projector_out"]["kernel"] * 10
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lm["layers"]["attn"][n]["kernel"] = lm["layers"]["attn"][n]["kernel"] * 4
    lm["embed_positions"] = 0.05 * jax.random.normal(jax.random.key(7), lm["embed_positions"].shape)
    return params, images


# Captions of `_sharp_model` (BOS 1, EOS 2, pad 0, 10 new tokens) from the captioner's former
# own decode loop (`two_towers._caption_fn`: a PrefixLM prefill + Transformer one-token steps,
# replaced by `lm_jax.generate.generate(prefix_embeds=)`).
OLD_LOOP = {
    "greedy": (
        [[10, 9, 9, 8, 9, 8, 9, 8, 8, 9], [10, 2, 0, 0, 0, 0, 0, 0, 0, 0],
         [10, 2, 0, 0, 0, 0, 0, 0, 0, 0]], [10, 2, 2], dict(),
    ),
    "sample3": (
        [[8, 8, 2, 0, 0, 0, 0, 0, 0, 0], [10, 10, 4, 2, 0, 0, 0, 0, 0, 0],
         [5, 7, 8, 7, 0, 10, 7, 10, 2, 0]], [3, 4, 9], dict(key=3, temperature=1.0),
    ),
    "sample4": (
        [[9, 2, 0, 0, 0, 0, 0, 0, 0, 0], [10, 10, 7, 6, 6, 5, 10, 6, 8, 1],
         [10, 0, 5, 10, 2, 0, 0, 0, 0, 0]], [2, 10, 5], dict(key=4, temperature=1.0),
    ),
    "top_k": (
        [[8, 9, 9, 2, 0, 0, 0, 0, 0, 0], [8, 2, 0, 0, 0, 0, 0, 0, 0, 0],
         [10, 2, 0, 0, 0, 0, 0, 0, 0, 0]], [4, 2, 2], dict(key=5, temperature=0.7, top_k=4),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OLD_LOOP))
def test_captions_equal_the_former_decode_loop(name):
    want, lengths, kw = OLD_LOOP[name]
    params, images = _sharp_model()
    if "key" in kw:
        kw = {**kw, "key": jax.random.key(kw["key"])}
    out = generate_with_prefix(SHARP, params, images, 1, 2, 10, **kw)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, lengths)


def test_sharp_greedy_equals_full_forward_argmax():
    """The greedy reference above is also a plain full-forward argmax loop (no cache)."""
    params, images = _sharp_model()
    fwd = jax.jit(lambda p, x, t: Captioner(SHARP).apply({"params": p}, x, t))
    seq = jnp.ones((3, 1), jnp.int32)
    for _ in range(10):
        nxt = jnp.argmax(fwd(params, images, seq)[:, -1], -1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], 1)
    want, lengths, _ = OLD_LOOP["greedy"]
    for b in range(3):
        n = lengths[b]
        np.testing.assert_array_equal(np.asarray(seq[b, 1 : 1 + n]), want[b][:n])


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
