"""Softmax attention in XLA with a hand-written backward pass (training off the GPU/TPU kernels).

    out = softmax(mask(cap(q k^T * scale))) v     q [B, T, N, H], k/v [B, S, K, H], K divides N

with scale = H ** -0.5 unless given, and cap(s) = softcap * tanh(s / softcap) when `softcap` is
set (Gemma 2's attention-logit soft-capping), else the identity.

Equal to `jax.nn.dot_product_attention(q, k, v, mask=mask)` (its XLA implementation), with two
changes that matter on XLA:CPU, where the `[B, N, T, S]` score tensors dominate the non-matmul time:
- the scale multiplies q (T x H numbers) instead of the scores (T x S);
- the backward pass uses the flash-attention identity dS = P * (dP - rowsum(dO * O)), one
  elementwise pass over the scores instead of the softmax VJP's several; the residuals are q, k,
  v, the output and the probabilities P.
Scores, softmax and P are float32; grouped-query heads (G = N / K query heads per KV head) share
K/V without copies. With soft-capping the backward pass multiplies dS by the cap's derivative
1 - tanh(s / softcap)^2, from scores recomputed from q and k (no extra residual).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)  # masked scores, as jax.nn.dot_product_attention


def _grouped(q, num_kv: int):
    B, T, N, H = q.shape
    return q.reshape(B, T, num_kv, N // num_kv, H)  # [B, T, K, G, H]


def _check_shapes(q, k, v, mask) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(
            f"need q [B, T, N, H], k = v [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}."
        )
    (B, T, N, H), (Bk, S, K, Hk) = q.shape, k.shape
    if Bk != B or Hk != H or N % K:
        raise ValueError(
            f"q {q.shape} and k/v {k.shape} must share batch and head size, and the KV heads "
            f"({K}) must divide the query heads ({N})."
        )
    if mask is not None and (
        mask.ndim != 4 or mask.shape[1] not in (1, N) or mask.shape[2:] != (T, S)
    ):
        raise ValueError(f"mask must be [B, 1 or {N}, {T}, {S}], got {mask.shape}.")


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def _scores(q, k, scale):
    """Scaled scores [B, K, G, T, S] float32 (before any soft cap)."""
    qg = _grouped(q * jnp.asarray(_scale(q, scale), q.dtype), k.shape[2])  # [B, T, K, G, H]
    return jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)


def _forward(q, k, v, mask, scale=None, softcap=None):
    _check_shapes(q, k, v, mask)
    B, T, N, H = q.shape
    s = _scores(q, k, scale)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if mask is not None:  # [B, 1 or N, T, S] -> [B, 1 or K, 1 or G, T, S]
        Bm, M, Tm, Sm = mask.shape
        K = k.shape[2]
        grouped = (Bm, 1, 1, Tm, Sm) if M == 1 else (Bm, K, N // K, Tm, Sm)
        s = jnp.where(mask.reshape(grouped), s, _NEG)
    p = jax.nn.softmax(s, axis=-1)  # [B, K, G, T, S] f32
    o = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v).reshape(B, T, N, H)
    return o, p


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def softmax_attention(q, k, v, mask=None, scale=None, softcap=None):
    """q [B, T, N, H], k/v [B, S, K, H], mask bool [B, 1 or N, T, S] (True = attend) or None
    -> [B, T, N, H]. scale: float (None = H ** -0.5); softcap: float or None."""
    return _forward(q, k, v, mask, scale, softcap)[0]


def _fwd(q, k, v, mask, scale, softcap):
    o, p = _forward(q, k, v, mask, scale, softcap)
    return o, (q, k, v, o, p, mask)


def _bwd(scale_arg, softcap, res, do):
    q, k, v, o, p, mask = res
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = _scale(q, scale_arg)
    dog = _grouped(do, K)  # [B, T, K, G, H]
    rowsum = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, T, N]
    rowsum = rowsum.reshape(B, T, K, -1).transpose(0, 2, 3, 1)[..., None]  # [B, K, G, T, 1]
    dv = jnp.einsum("btkgh,bkgts->bskh", dog, p.astype(do.dtype))  # [B, S, K, H]
    dp = jnp.einsum("btkgh,bskh->bkgts", dog, v, preferred_element_type=jnp.float32)
    ds = p * (dp - rowsum)  # [B, K, G, T, S] f32; masked entries have p = 0
    if softcap is not None:  # through cap(s) = softcap * tanh(s / softcap)
        t = jnp.tanh(_scores(q, k, scale_arg) / softcap)
        ds = ds * (1.0 - t * t)
    ds = ds.astype(q.dtype)
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, k * jnp.asarray(scale, k.dtype)).reshape(q.shape)
    dk = jnp.einsum("btkgh,bkgts->bskh", _grouped(q * jnp.asarray(scale, q.dtype), K), ds)
    return dq, dk, dv, None


softmax_attention.defvjp(_fwd, _bwd)


MAX_QUERY_BLOCKS = 16  # bounds the unrolled calls (and compile time) at long T


def causal_block_attention(q, k, v, mask, block: int, scale=None, softcap=None):
    """`softmax_attention` for causal self-attention (S = T), skipping the key blocks above the
    diagonal: query rows [s, e) attend keys [0, e) only, so about half of the [T, S] score work
    (and its memory traffic) is never done. Exact when `mask` is index-causal (mask[..., i, j] is
    False for j > i), as the causal `Attention` builds it. block <= 0 or >= T: one block; blocks
    grow to ceil(T / MAX_QUERY_BLOCKS) rows when `block` would make more than that many.

    q [B, T, N, H], k/v [B, T, K, H], mask bool [B, 1 or N, T, T] -> [B, T, N, H]; scale and
    softcap as `softmax_attention`."""
    T = q.shape[1]
    if block <= 0 or block >= T:
        return softmax_attention(q, k, v, mask, scale, softcap)
    if k.shape[1] != T or mask is None or mask.shape[-2:] != (T, T):
        raise ValueError(
            f"causal_block_attention needs self-attention with a [.., {T}, {T}] mask; got k "
            f"{k.shape} and mask {None if mask is None else mask.shape}."
        )
    block = max(block, -(-T // MAX_QUERY_BLOCKS))
    outs = []
    for s in range(0, T, block):
        e = min(s + block, T)
        qs, ks, vs, ms = q[:, s:e], k[:, :e], v[:, :e], mask[:, :, s:e, :e]
        outs.append(softmax_attention(qs, ks, vs, ms, scale, softcap))
    return jnp.concatenate(outs, axis=1)
