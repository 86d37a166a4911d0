"""Multi-head / grouped-query causal self-attention with RoPE, segment masking and a KV cache."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.layers import Dense
from lm_jax.nn.rope import apply_rope, rope_inv_freq
from lm_jax.nn.softmax_attention import causal_block_attention, softmax_attention
from lm_jax.nn.splash import resolve_impl, splash_attention
from lm_jax.sharding import constrain


class LayerCache(NamedTuple):
    """One layer's KV cache: k, v [B, S, K, H]."""

    k: jax.Array
    v: jax.Array


def make_attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: causal by position, same segment, within the sliding window.

    q_pos [B, T], k_pos [B, S] are token positions; segments [B, T] / [B, S] keep packed
    documents apart (positions restart per document, so causality by position is exact within
    a segment).
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask &= (qp - kp) < window
    if q_seg is not None and k_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask[:, None, :, :]


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter new [B, T, K, H] into cache [B, S, K, H] at per-row positions [B, T]."""
    rows = jnp.broadcast_to(jnp.arange(cache.shape[0])[:, None], positions.shape)
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


def attend(q, k, v, mask, impl: str | None):
    """Training/prefill attention: cuDNN through `jax.nn.dot_product_attention` when `impl` is
    "cudnn", else `softmax_attention` (XLA, hand-written backward)."""
    if impl is None:
        return softmax_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


class Attention(nn.Module):
    """Causal self-attention.

    1. project x to q [B,T,N,H], k/v [B,T,K,H] (K divides N: MHA, GQA or MQA);
    2. rotate q, k by RoPE at `positions` (Llama family);
    3. with a cache, write k/v at `positions` and attend over the whole cache [B,S,K,H];
    4. softmax(q k^T / sqrt(H)) v, f32 softmax: `lm_jax.nn.softmax_attention` (XLA, hand-written
       backward; causal rows in blocks of `cfg.attention_q_block` queries that skip the keys
       above the diagonal), `jax.nn.dot_product_attention` over a KV cache, or the kernel
       `cfg.attention_impl` selects (`lm_jax.nn.splash`: xla / cudnn / splash / auto);
    5. project back with o_proj.
    """

    cfg: ModelConfig
    causal: bool = True  # False: bidirectional (encoders: ViT, text towers); segments still apply

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        segment_ids: jax.Array | None = None,  # [B, T]
        cache: LayerCache | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.cfg
        B, T, _ = x.shape
        N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim_
        q = Dense(N * H, ("embed", "heads"), cfg, cfg.use_bias, name="q_proj")(x)
        k = Dense(K * H, ("embed", "kv_heads"), cfg, cfg.use_bias, name="k_proj")(x)
        v = Dense(K * H, ("embed", "kv_heads"), cfg, cfg.use_bias, name="v_proj")(x)
        q = q.reshape(B, T, N, H)  # [B, T, N, H]
        k = k.reshape(B, T, K, H)  # [B, T, K, H]
        v = v.reshape(B, T, K, H)
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(H, cfg.rope_theta, cfg.rope_scaling)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)

        kernel = resolve_impl(cfg.attention_impl, cfg.compute_dtype)  # xla / cudnn / splash
        impl = "cudnn" if kernel == "cudnn" else None
        if not self.causal:
            if cache is not None:
                raise ValueError("a bidirectional (causal=False) Attention has no KV cache.")
            mask = None
            if segment_ids is not None:  # [B, 1, T, T]: same segment (0 = padding) only
                mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
            out = attend(q, k, v, mask, impl)
        elif cache is not None:
            cache = LayerCache(
                write_cache(cache.k, k, positions), write_cache(cache.v, v, positions)
            )
            S = cache.k.shape[1]
            k_pos = jnp.broadcast_to(jnp.arange(S, dtype=positions.dtype), (B, S))
            mask = make_attention_mask(positions, k_pos, window=cfg.sliding_window)
            out = jax.nn.dot_product_attention(
                q,
                cache.k.astype(q.dtype),
                cache.v.astype(q.dtype),
                mask=mask,  # any positions: the XLA path (fused kernels index causality)
            )
        elif kernel == "splash":
            out = splash_attention(q, k, v, segment_ids, cfg.sliding_window)
        elif segment_ids is None and impl is not None:
            window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=window, implementation=impl
            )
        else:  # causal by position (and same segment when given), and by index
            mask = make_attention_mask(
                positions, positions, segment_ids, segment_ids, window=cfg.sliding_window
            )
            mask &= jnp.tril(jnp.ones((T, T), bool))
            if impl is None:  # XLA: key blocks above the diagonal are skipped
                out = causal_block_attention(q, k, v, mask, cfg.attention_q_block)
            else:
                out = attend(q, k, v, mask, impl)
        out = constrain(out, ("batch", "length", "act_heads", None))
        out = out.reshape(B, T, N * H)
        o_std = cfg.initializer_range / (2 * cfg.num_layers) ** 0.5
        y = Dense(cfg.d_model, ("heads", "embed"), cfg, cfg.use_bias, o_std, name="o_proj")(out)
        return y, cache
