"""Attention kernels selected by ModelConfig.attention_impl agree (issue 11, item 2).

On CPU: XLA with a position/segment mask, XLA `is_causal` / `local_window_size`, a plain einsum
reference and the Pallas splash kernel (interpret mode) agree within 1e-5 in f32, forward and
gradient. cuDNN runs only on an NVIDIA GPU (bf16 tolerance there).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import llama_style
from lm_jax.configs.base import ConfigError
from lm_jax.nn import Transformer
from lm_jax.nn.attention import make_attention_mask
from lm_jax.nn.splash import resolve_impl, splash_attention

B, T, N, K, H = 2, 128, 4, 2, 16


def _qkv(seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal((B, T, n, H)), jnp.float32) for n in (N, K, K)]


def _reference(q, k, v, mask):  # plain einsum softmax attention, GQA by repeating k/v
    k, v = jnp.repeat(k, N // K, 2), jnp.repeat(v, N // K, 2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("window", [None, 48])
def test_xla_paths_and_splash_agree_f32(window):
    q, k, v = _qkv()
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = make_attention_mask(pos, pos, window=window)  # [B, 1, T, T]
    ref = _reference(q, k, v, mask)
    lw = None if window is None else (window - 1, 0)
    outs = {
        "xla_mask": jax.nn.dot_product_attention(q, k, v, mask=mask),
        "xla_is_causal": jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=lw, implementation="xla"
        ),
        "splash": splash_attention(q, k, v, None, window),
    }
    for name, out in outs.items():
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=name)


def test_splash_with_packed_segments_matches_xla_forward_and_grad():
    q, k, v = _qkv(1)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], B, 0).repeat(T // 4, 1), jnp.int32)
    pos = jnp.asarray(np.tile(np.arange(T // 4), (B, 4)), jnp.int32)  # restarts per segment
    mask = make_attention_mask(pos, pos, seg, seg)

    def loss(fn, q):
        out = fn(q)  # padding rows (segment 0) are excluded from the comparison
        return jnp.sum(jnp.where(seg[..., None, None] > 0, out, 0) ** 2)

    xla = lambda q: jax.nn.dot_product_attention(q, k, v, mask=mask)  # noqa: E731
    spl = lambda q: splash_attention(q, k, v, seg)  # noqa: E731
    keep = (seg > 0)[..., None, None]
    np.testing.assert_allclose(jnp.where(keep, spl(q), 0), jnp.where(keep, xla(q), 0), atol=1e-5)
    g_x, g_s = jax.grad(lambda q: loss(xla, q))(q), jax.grad(lambda q: loss(spl, q))(q)
    np.testing.assert_allclose(g_s, g_x, atol=1e-4, rtol=1e-5)


def test_transformer_attention_impl_switch_agrees():
    cfg = llama_style(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg = cfg.replace(max_len=T)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, T)), jnp.int32)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)["params"])
    ref = Transformer(cfg).apply({"params": params}, tokens)
    for impl in ("auto", "splash"):
        out = Transformer(cfg.replace(attention_impl=impl)).apply({"params": params}, tokens)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=impl)


def test_splash_mixed_layers_soft_cap_and_scale_agree_with_xla():
    """Gemma-style layers: local (window 48) then global, soft-capped scores, query scalar != H.
    Splash picks its window per layer under `lax.cond`; logits equal the XLA path's."""
    cfg = llama_style(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg = cfg.replace(
        max_len=T, sliding_window=48, layer_types=("local", "global"), attn_softcap=2.0,
        query_pre_attn_scalar=8.0, initializer_range=0.2,
    )  # fmt: skip
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, T)), jnp.int32)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)["params"])
    ref = Transformer(cfg).apply({"params": params}, tokens)
    out = Transformer(cfg.replace(attention_impl="splash")).apply({"params": params}, tokens)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    alike = Transformer(cfg.replace(layer_types=None)).apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(alike - ref))) > 1e-3  # the global layer is not windowed


def test_splash_eager_then_under_jit():
    """The splash kernel is not shared between traces (a reused one leaked the first trace's
    arrays into the next: UnexpectedTracerError under jit after an eager call)."""
    cfg = llama_style(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg = cfg.replace(max_len=T)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, T)), jnp.int32)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)["params"])
    ref = Transformer(cfg).apply({"params": params}, tokens)
    sp = cfg.replace(attention_impl="splash")
    eager = Transformer(sp).apply({"params": params}, tokens)
    jitted = jax.jit(lambda p, x: Transformer(sp).apply({"params": p}, x))(params, tokens)
    np.testing.assert_allclose(eager, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(jitted, ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_bf16():
    q, k, v = [x.astype(jnp.bfloat16) for x in _qkv()]
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    ref = jax.nn.dot_product_attention(q, k, v, mask=make_attention_mask(pos, pos))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


def test_bad_attention_impl_and_lengths_raise_clear_errors():
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        resolve_impl("flash", jnp.float32)
    with pytest.raises(ConfigError, match="attention_impl must be"):
        llama_style(attention_impl="flash")
    with pytest.raises(ConfigError, match="attention_q_block must be >= 0"):
        llama_style(attention_q_block=-1)
    assert resolve_impl("auto", jnp.float32) == "xla"  # CPU
    q, k, v = [x[:, :100] for x in _qkv()]
    with pytest.raises(ConfigError, match="multiple of 128"):
        splash_attention(q, k, v)
