"""Multi-head / grouped-query causal self-attention with RoPE, segment masking and a KV cache."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.layers import Dense, Norm
from lm_jax.nn.rope import apply_rope, layer_inv_freq
from lm_jax.nn.softmax_attention import causal_block_attention, softmax_attention
from lm_jax.nn.splash import resolve_impl, splash_attention
from lm_jax.sharding import constrain


class LayerCache(NamedTuple):
    """One layer's KV cache: k, v [B, S, K, H]; slot s holds position s."""

    k: jax.Array
    v: jax.Array


class RingCache(NamedTuple):
    """A sliding-window layer's KV cache as a ring buffer: position p lives in slot p % S, and
    `pos` [B, S] int32 records the position each slot holds (-1: empty). S = window + (tokens
    written per call) - 1 keeps every key a query of that call can see (`ring_cache_len`). A
    call's tokens of segment 0 (prompt padding) are not written, so they displace no key."""

    k: jax.Array  # [B, S, K, H]
    v: jax.Array
    pos: jax.Array  # [B, S]


def make_attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
    window: int | None = None,
    local: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: causal by position, same segment, within the sliding window.

    q_pos [B, T], k_pos [B, S] are token positions; segments [B, T] / [B, S] keep packed
    documents apart (positions restart per document, so causality by position is exact within
    a segment). `local` (a traced scalar bool, mixed local/global layers): the window applies
    only where it is true.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = kp <= qp
    if window is not None:
        inside = (qp - kp) < window
        mask &= inside if local is None else (inside | ~local)
    if q_seg is not None and k_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask[:, None, :, :]


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter new [B, T, K, H] into cache [B, S, K, H] at per-row positions [B, T]."""
    rows = jnp.broadcast_to(jnp.arange(cache.shape[0])[:, None], positions.shape)
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


def attend(q, k, v, mask, impl: str | None, scale=None, softcap=None):
    """Training/prefill attention: cuDNN through `jax.nn.dot_product_attention` when `impl` is
    "cudnn" (no soft cap), else `softmax_attention` (XLA, hand-written backward)."""
    if impl is None:
        return softmax_attention(q, k, v, mask, scale, softcap)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


def by_window(fn, window: int | None, local: jax.Array | None):
    """fn(window) for kernels that take a static window: under a mixed scan (`local` traced)
    `lax.cond` picks fn(window) for local layers and fn(None) for global ones."""
    if local is None or window is None:
        return fn(window)
    return jax.lax.cond(local, lambda: fn(window), lambda: fn(None))


def layer_window(cfg: ModelConfig, local: jax.Array | None) -> int | None:
    """The sliding window to mask with: `cfg.sliding_window` under a mixed scan (the `local`
    flag then gates it), else that of the (alike) layers."""
    if local is not None or cfg.local_layers[0]:
        return cfg.sliding_window
    return None


class Attention(nn.Module):
    """Causal self-attention.

    1. project x to q [B,T,N,H], k/v [B,T,K,H] (K divides N: MHA, GQA or MQA);
    2. rotate q, k by RoPE at `positions` (Llama family);
    3. with a cache, write k/v at `positions` and attend over the whole cache [B,S,K,H]
       (a `RingCache`: at `positions` mod S, masked by the positions its slots hold);
    4. softmax(q k^T / sqrt(H)) v, f32 softmax: `lm_jax.nn.softmax_attention` (XLA, hand-written
       backward; causal rows in blocks of `cfg.attention_q_block` queries that skip the keys
       above the diagonal), `jax.nn.dot_product_attention` over a KV cache, or the kernel
       `cfg.attention_impl` selects (`lm_jax.nn.splash`: xla / cudnn / splash / auto);
    5. project back with o_proj.

    Family options: q/k/v biases (`cfg.qkv_bias`), q/k norms over H before RoPE (`qk_norm`),
    the scale `query_pre_attn_scalar ** -0.5`, soft-capped scores (`attn_softcap`; cuDNN has
    no soft cap, so such models take the XLA path there). `local` is this layer's traced flag
    when the scan mixes sliding-window and global layers (`cfg.mixed_layers`): it picks the
    window and the RoPE table; None when every layer is alike. `key_mask` (bidirectional only):
    keys to attend, as BERT's `attention_mask` (padding queries still attend the real keys).
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
        local: jax.Array | None = None,  # scalar bool: this layer is local (mixed scans only)
        key_mask: jax.Array | None = None,  # [B, T] bool, True = attend to this key (causal=False)
    ) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.cfg
        B, T, _ = x.shape
        N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim_
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q = Dense(N * H, ("embed", "heads"), cfg, qkv_bias, name="q_proj")(x)
        k = Dense(K * H, ("embed", "kv_heads"), cfg, qkv_bias, name="k_proj")(x)
        v = Dense(K * H, ("embed", "kv_heads"), cfg, qkv_bias, name="v_proj")(x)
        q = q.reshape(B, T, N, H)  # [B, T, N, H]
        k = k.reshape(B, T, K, H)  # [B, T, K, H]
        v = v.reshape(B, T, K, H)
        if cfg.qk_norm:  # per head, over H
            q = Norm(cfg, name="q_norm")(q)
            k = Norm(cfg, name="k_norm")(k)
        if cfg.position == "rope":
            inv_freq = layer_inv_freq(cfg, local)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)

        q_scalar = cfg.query_pre_attn_scalar
        scale = None if q_scalar is None else float(q_scalar) ** -0.5  # None: H ** -0.5
        softcap = cfg.attn_softcap
        window = layer_window(cfg, local)
        kernel = resolve_impl(cfg.attention_impl, cfg.compute_dtype)  # xla / cudnn / splash
        if kernel == "cudnn" and softcap is not None:
            kernel = "xla"
        impl = "cudnn" if kernel == "cudnn" else None
        if key_mask is not None and self.causal:
            raise ValueError("key_mask is for bidirectional (causal=False) attention only.")
        if not self.causal:
            if cache is not None:
                raise ValueError("a bidirectional (causal=False) Attention has no KV cache.")
            mask = None
            if segment_ids is not None:  # [B, 1, T, T]: same segment (0 = padding) only
                mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
            if key_mask is not None:  # [B, 1, T, T]: real keys only
                km = jnp.broadcast_to(key_mask.astype(bool)[:, None, None, :], (B, 1, T, T))
                mask = km if mask is None else mask & km
            out = attend(q, k, v, mask, impl, scale, softcap)
        elif cache is not None:
            if isinstance(cache, RingCache):  # slot = position mod S; pos says what is there
                if window is None or local is not None:
                    raise ValueError("a ring-buffer KV cache needs every layer sliding-window.")
                S = cache.k.shape[1]
                slot = positions % S
                if segment_ids is not None:  # padding (segment 0) is not written: S = dropped
                    slot = jnp.where(segment_ids > 0, slot, S)
                cache = RingCache(
                    write_cache(cache.k, k, slot), write_cache(cache.v, v, slot),
                    write_cache(cache.pos, positions, slot),
                )  # fmt: skip
                k_pos = cache.pos
                mask = make_attention_mask(positions, k_pos, window=window)
                mask &= (k_pos >= 0)[:, None, None, :]
            else:
                cache = LayerCache(
                    write_cache(cache.k, k, positions), write_cache(cache.v, v, positions)
                )
                S = cache.k.shape[1]
                k_pos = jnp.broadcast_to(jnp.arange(S, dtype=positions.dtype), (B, S))
                mask = make_attention_mask(positions, k_pos, window=window, local=local)
            ck, cv = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
            if softcap is None:  # any positions: the XLA path (fused kernels index causality)
                out = jax.nn.dot_product_attention(q, ck, cv, mask=mask, scale=scale)
            else:
                out = softmax_attention(q, ck, cv, mask, scale, softcap)
        elif kernel == "splash":
            out = by_window(
                lambda w: splash_attention(q, k, v, segment_ids, w, scale, softcap), window, local
            )
        elif segment_ids is None and impl is not None:

            def cudnn(w):
                lw = None if w is None else (w - 1, 0)
                return jax.nn.dot_product_attention(
                    q, k, v, scale=scale, is_causal=True, local_window_size=lw, implementation=impl
                )

            out = by_window(cudnn, window, local)
        else:  # causal by position (and same segment when given), and by index
            mask = make_attention_mask(
                positions, positions, segment_ids, segment_ids, window=window, local=local
            )
            mask &= jnp.tril(jnp.ones((T, T), bool))
            if impl is None:  # XLA: key blocks above the diagonal are skipped
                out = causal_block_attention(q, k, v, mask, cfg.attention_q_block, scale, softcap)
            else:
                out = attend(q, k, v, mask, impl, scale)
        out = constrain(out, ("batch", "length", "act_heads", None))
        out = out.reshape(B, T, N * H)
        o_std = cfg.initializer_range / (2 * cfg.num_layers) ** 0.5
        y = Dense(cfg.d_model, ("heads", "embed"), cfg, cfg.use_bias, o_std, name="o_proj")(out)
        return y, cache
