"""Compression of Dense kernels: magnitude pruning, 2:4 structured pruning, int8 weights.

All functions are pure maps over a params tree and select kernels by regex over their path
(`jax.tree_util.keystr` form, e.g. "['layers']['mlp']['up_proj']['kernel']").
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

DEFAULT_KERNELS = r"\['(q|k|v|o|gate|up|down)_proj'\]\['kernel'\]"


def _map_kernels(fn, params, pattern: str):
    rx = re.compile(pattern)
    hits = []

    def one(path, x):
        if rx.search(jax.tree_util.keystr(path)):
            hits.append(jax.tree_util.keystr(path))
            return fn(x)
        return x

    out = jax.tree_util.tree_map_with_path(one, params)
    if not hits:
        raise ValueError(f"kernel pattern {pattern!r} matches no parameter")
    return out


def magnitude_prune(params, sparsity: float, pattern: str = DEFAULT_KERNELS):
    """Zero the `sparsity` fraction of smallest-|w| entries of each matched kernel (per matrix).

    Kernels stacked over layers [L, D_in, D_out] are pruned per layer.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")

    def prune(w):
        flat = jnp.abs(w).reshape(w.shape[0], -1) if w.ndim == 3 else jnp.abs(w).reshape(1, -1)
        k = int(flat.shape[1] * sparsity)
        if k == 0:
            return w
        thresh = jnp.sort(flat, axis=1)[:, k - 1]  # [L] or [1]
        thresh = thresh.reshape((-1,) + (1,) * (w.ndim - 1)) if w.ndim == 3 else thresh[0]
        return jnp.where(jnp.abs(w) > thresh, w, 0).astype(w.dtype)

    return _map_kernels(prune, params, pattern)


def prune_2_4(params, pattern: str = DEFAULT_KERNELS):
    """2:4 structured sparsity: in every group of 4 consecutive input weights of an output
    column keep the 2 largest |w| (the layout sparse tensor cores accelerate)."""

    def prune(w):
        d_in = w.shape[-2]
        if d_in % 4:
            raise ValueError(f"2:4 pruning needs the input dim divisible by 4, got {d_in}")
        g = jnp.moveaxis(w, -2, -1)  # [..., D_out, D_in]
        g = g.reshape(g.shape[:-1] + (d_in // 4, 4))
        rank = jnp.argsort(jnp.argsort(-jnp.abs(g), axis=-1), axis=-1)  # 0 = largest
        g = jnp.where(rank < 2, g, 0)
        return jnp.moveaxis(g.reshape(g.shape[:-2] + (d_in,)), -1, -2).astype(w.dtype)

    return _map_kernels(prune, params, pattern)


def sparsity_of(params, pattern: str = DEFAULT_KERNELS) -> float:
    rx = re.compile(pattern)
    zeros = total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if rx.search(jax.tree_util.keystr(path)):
            zeros += int(jnp.sum(x == 0))
            total += x.size
    return zeros / max(total, 1)


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel int8: w ~= q * scale. w [..., D_in, D_out]."""
    amax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)  # [..., 1, D_out]
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * scale).astype(dtype)


def quantize_params(params, pattern: str = DEFAULT_KERNELS):
    """Matched kernels -> {'q': int8, 'scale': f32} (4x smaller); `dequantize_params` inverts."""
    return _map_kernels(lambda w: dict(zip(("q", "scale"), quantize_int8(w))), params, pattern)


def dequantize_params(qparams, dtype=jnp.float32):
    def is_q(x):
        return isinstance(x, dict) and set(x) == {"q", "scale"}

    return jax.tree.map(
        lambda x: dequantize_int8(x["q"], x["scale"], dtype) if is_q(x) else x,
        qparams,
        is_leaf=is_q,
    )
