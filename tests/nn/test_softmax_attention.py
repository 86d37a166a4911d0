"""`lm_jax.nn.softmax_attention` (hand-written backward) equals jax.nn.dot_product_attention.

Forward and gradients of q, k, v in f32 (<= 1e-5) for MHA, GQA and MQA with no mask, a causal
packed-segment mask [B, 1, T, S] and a per-head mask [B, N, T, S]; bf16 inputs within bf16
tolerance; and the Transformer's training path uses it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.nn.attention import make_attention_mask
from lm_jax.nn.softmax_attention import softmax_attention

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


def test_transformer_training_path_uses_it(monkeypatch):
    """The Transformer's XLA training path goes through softmax_attention (counted calls)."""
    from lm_jax.configs import llama_style
    from lm_jax.nn import Transformer
    from lm_jax.nn import attention as attention_mod

    calls = []
    real = attention_mod.softmax_attention
    monkeypatch.setattr(attention_mod, "softmax_attention", lambda *a: calls.append(1) or real(*a))
    cfg = llama_style(vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2)
    tokens = jnp.zeros((1, 8), jnp.int32)
    Transformer(cfg).init(jax.random.key(0), tokens)
    assert calls


def test_bad_shapes_are_clear_errors():
    q, k, v, _, mask = _inputs(6, 4, "causal_segments")  # 4 KV heads do not divide 6
    with pytest.raises(ValueError, match="must divide the query heads"):
        softmax_attention(q, k, v, mask)
    q, k, v, _, mask = _inputs(4, 2, "causal_segments")
    with pytest.raises(ValueError, match="mask must be"):
        softmax_attention(q, k, v, mask[:, :, :5])
