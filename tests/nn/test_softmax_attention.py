"""`lm_jax.nn.softmax_attention` (hand-written backward) equals jax.nn.dot_product_attention.

Forward and gradients of q, k, v in f32 (<= 1e-5) for MHA, GQA and MQA with no mask, a causal
packed-segment mask [B, 1, T, S] and a per-head mask [B, N, T, S]; bf16 inputs within bf16
tolerance; and the Transformer's training path uses it. `causal_block_attention` (query blocks that
skip the keys above the diagonal) equals jax.nn.dot_product_attention the same way, and a
Transformer's loss and parameter gradients are the same with and without blocks.
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.nn.attention import make_attention_mask
from lm_jax.nn.softmax_attention import causal_block_attention, softmax_attention

B, T, H = 2, 24, 8


def _inputs(N, K, mask_kind, seed=0):
    r = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(r.standard_normal((B, T, n, H)), jnp.float32) for n in (N, K, K, N))
    pos = jnp.asarray(np.tile(np.r_[np.arange(9), np.arange(T - 9)], (B, 1)))  # 2 documents
    seg = jnp.asarray(np.tile(np.r_[np.ones(9), 2 * np.ones(T - 9)], (B, 1)), jnp.int32)
    mask = None
    if mask_kind != "none":
        mask = make_attention_mask(pos, pos, seg, seg)  # [B, 1, T, T]
    if mask_kind == "heads":  # random per-head mask on top, the diagonal always kept
        keep = jnp.asarray(r.random((B, N, T, T)) > 0.3) | jnp.eye(T, dtype=bool)
        mask = mask & keep
    return q, k, v, w, mask


@pytest.mark.parametrize("N,K", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "causal_segments", "heads"])
def test_equals_dot_product_attention_forward_and_grads(N, K, mask_kind):
    q, k, v, w, mask = _inputs(N, K, mask_kind)

    def run(fn):
        f = lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref_loss, ref_grads = run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))
    loss, grads = run(lambda q, k, v: softmax_attention(q, k, v, mask))
    assert abs(float(loss - ref_loss)) <= 1e-4 * max(1.0, abs(float(ref_loss)))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(r).max()) > 1e-2, name  # the gradient is not trivially zero
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=name)


def test_bf16_within_bf16_tolerance_of_f32():
    q, k, v, w, mask = _inputs(4, 2, "causal_segments", seed=1)
    f32 = softmax_attention(q, k, v, mask)
    b = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    bf16 = softmax_attention(*b, mask)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), f32, atol=5e-2, rtol=0)
    grads = jax.grad(lambda q, k, v: jnp.sum(softmax_attention(q, k, v, mask)), (0, 1, 2))(*b)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("q_block", [0, 4, 8])
def test_transformer_training_path_uses_it(monkeypatch, q_block):
    """The Transformer's XLA training path goes through softmax_attention (counted calls), once
    per layer and query block."""
    from lm_jax.configs import llama_style
    from lm_jax.nn import Transformer

    sa_mod = importlib.import_module("lm_jax.nn.softmax_attention")
    calls = []
    real = sa_mod.softmax_attention
    monkeypatch.setattr(sa_mod, "softmax_attention", lambda *a: calls.append(1) or real(*a))
    cfg = llama_style(
        vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, scan_unroll=2
    )
    cfg = dataclasses.replace(cfg, attention_q_block=q_block)
    tokens = jnp.zeros((1, 8), jnp.int32)
    Transformer(cfg).init(jax.random.key(0), tokens)
    assert len(calls) == 2 * (1 if q_block in (0, 8) else 2)  # 2 unrolled layers x blocks


@pytest.mark.parametrize("block", [8, 7, 1])  # 7: a ragged last block; 1: capped at 12 blocks
@pytest.mark.parametrize("mask_kind", ["causal_segments", "heads"])
def test_causal_blocks_equal_dot_product_attention(block, mask_kind):
    q, k, v, w, mask = _inputs(8, 2, mask_kind, seed=2)
    mask = mask & jnp.tril(jnp.ones((T, T), bool))  # index-causal, as Attention builds it

    def run(fn):
        f = lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref_loss, ref_grads = run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))
    loss, grads = run(lambda q, k, v: causal_block_attention(q, k, v, mask, block))
    assert abs(float(loss - ref_loss)) <= 1e-4 * max(1.0, abs(float(ref_loss)))
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=name)


def test_block_count_is_capped(monkeypatch):
    sa_mod = importlib.import_module("lm_jax.nn.softmax_attention")
    calls = []
    real = sa_mod.softmax_attention
    monkeypatch.setattr(sa_mod, "softmax_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, _, mask = _inputs(4, 4, "causal_segments")
    causal_block_attention(q, k, v, mask & jnp.tril(jnp.ones((T, T), bool)), 1)
    assert sa_mod.MAX_QUERY_BLOCKS == 16 and len(calls) == 12  # T = 24: blocks of ceil(24 / 16)


def test_transformer_blocked_equals_unblocked():
    """Logits and parameter gradients with attention_q_block 8 (3 blocks) equal one block, on
    packed rows of two documents."""
    from lm_jax.configs import gpt2_style
    from lm_jax.nn import Transformer

    base = gpt2_style(vocab_size=32, d_model=16, num_layers=2, num_heads=4, max_len=T)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, (B, T)), jnp.int32)
    pos = jnp.asarray(np.tile(np.r_[np.arange(9), np.arange(T - 9)], (B, 1)))
    seg = jnp.asarray(np.tile(np.r_[np.ones(9), 2 * np.ones(T - 9)], (B, 1)), jnp.int32)
    params = Transformer(base).init(jax.random.key(0), tokens)["params"]

    def loss(cfg):
        model = Transformer(cfg)
        f = lambda p: jnp.mean(model.apply({"params": p}, tokens, pos, seg)[0] ** 2)  # noqa: E731
        return jax.value_and_grad(f)(params)

    ref = loss(dataclasses.replace(base, attention_q_block=0))
    got = loss(dataclasses.replace(base, attention_q_block=8))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)


def test_bad_shapes_are_clear_errors():
    q, k, v, _, mask = _inputs(6, 4, "causal_segments")  # 4 KV heads do not divide 6
    with pytest.raises(ValueError, match="must divide the query heads"):
        softmax_attention(q, k, v, mask)
    q, k, v, _, mask = _inputs(4, 2, "causal_segments")
    with pytest.raises(ValueError, match="mask must be"):
        softmax_attention(q, k, v, mask[:, :, :5])
    with pytest.raises(ValueError, match="self-attention"):
        causal_block_attention(q, k, v, None, 8)


def _capped_reference(q, k, v, mask, scale, cap):
    """Plain einsum attention with Gemma 2's soft cap, autodiff backward (GQA by repeats)."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    s = cap * jnp.tanh(s / cap)
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("blocked", [False, True])
def test_scale_and_soft_cap_forward_and_grads(blocked):
    """scale != H ** -0.5 and a soft cap that bites (|scores| reach several caps): forward and
    the hand-written backward (dS times 1 - tanh^2) equal autodiff of a plain reference."""
    q, k, v, w, mask = _inputs(4, 2, "causal_segments", seed=4)
    mask = mask & jnp.tril(jnp.ones((T, T), bool))
    scale, cap = 0.6, 1.5

    def run(fn):
        f = lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref_loss, ref_grads = run(lambda q, k, v: _capped_reference(q, k, v, mask, scale, cap))
    if blocked:
        fn = lambda q, k, v: causal_block_attention(q, k, v, mask, 8, scale, cap)  # noqa: E731
    else:
        fn = lambda q, k, v: softmax_attention(q, k, v, mask, scale, cap)  # noqa: E731
    loss, grads = run(fn)
    uncapped = run(lambda q, k, v: softmax_attention(q, k, v, mask, scale))[0]
    assert abs(float(uncapped - ref_loss)) > 1e-2  # the cap changes the result
    assert abs(float(loss - ref_loss)) <= 1e-4 * max(1.0, abs(float(ref_loss)))
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=name)
