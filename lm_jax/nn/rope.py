"""Rotary position embeddings (HF "rotate_half" convention), with optional Llama-3, linear or
per-frequency (a GGUF's rope_freqs) scaling, and per-layer tables for models that mix local
and global layers (Gemma 3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [H/2] (float64 numpy, so the table is exact before the cast)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv
    s = scaling
    if s.rope_type == "linear":
        return inv / s.factor
    if s.rope_type == "factors":
        if len(s.factors) != len(inv):
            raise ValueError(
                f"rope_scaling.factors has {len(s.factors)} entries but head_dim {head_dim} has "
                f"{len(inv)} frequencies."
            )
        return inv / np.asarray(s.factors, np.float64)
    low_wavelen = s.original_max_len / s.low_freq_factor
    high_wavelen = s.original_max_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def kind_inv_freq(cfg: ModelConfig, local: bool) -> np.ndarray:
    """[H/2] for a local (sliding-window) or global layer: local layers use
    `rope_local_theta` unscaled when it is set, else `rope_theta` and `rope_scaling`."""
    if local and cfg.rope_local_theta is not None:
        return rope_inv_freq(cfg.head_dim_, cfg.rope_local_theta)
    return rope_inv_freq(cfg.head_dim_, cfg.rope_theta, cfg.rope_scaling)


def layer_inv_freq(cfg: ModelConfig, local: jax.Array | None):
    """[H/2] for this layer: `local` is the layer's traced flag under a mixed scan, or None when
    every layer is alike (a constant table)."""
    if local is None:
        return kind_inv_freq(cfg, cfg.local_layers[0])
    loc, glob = kind_inv_freq(cfg, True), kind_inv_freq(cfg, False)
    return jnp.where(local, jnp.asarray(loc, jnp.float32), jnp.asarray(glob, jnp.float32))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotate x [B, T, N, H] by angles positions [B, T] x inv_freq [H/2]; math in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
