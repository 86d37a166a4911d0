"""Vision Transformer (ViT) reusing the LM's Attention / MLP / Norm blocks, bidirectionally.

images [B, H, W, C] float -> conv patch embedding (kernel = stride = p, as a matmul over
patches) -> [CLS] + patches + positions (learned or fixed 2-D sin-cos) -> optional pre-norm ->
L pre-LN `Block`s with `causal=False` (scanned: params under `layers` with a leading L axis, as
the decoder) -> final norm -> pooling (CLS token, MAP attention-pooling head, or mean).

Params: `patch_embed_kernel [p,p,C,D]`, `patch_embed_bias [D]` (optional), `cls [D]` (CLS
pooling), `pos_embed [P(+1),D]` (learned positions), `pre_norm/*`, `layers/...` (as the
decoder's), `norm/*`, `head/{probe,q,k,v,o,norm,mlp}` (MAP).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.nn.layers import Dense, Norm, normal_init
from lm_jax.nn.mlp import MLP
from lm_jax.nn.scan import scan_blocks
from lm_jax.nn.transformer import ACT_NAMES, Block
from lm_jax.sharding import constrain


class ImageInputError(ValueError):
    """Images have the wrong rank, size, channel count or dtype for the vision tower."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT settings; `encoder` gives width, depth, heads, MLP, norm and activation of the blocks."""

    encoder: ModelConfig = ModelConfig(
        d_model=64, num_layers=2, num_heads=4, norm="layernorm", activation="gelu_tanh",
        gated_mlp=False, use_bias=True, position="learned", vocab_size=1, max_len=1,
    )  # fmt: skip
    image_size: int = 32  # H = W
    patch_size: int = 8  # p; P = (H / p)^2 patches
    channels: int = 1  # C
    position: Literal["learned", "sincos"] = "learned"
    pooling: Literal["cls", "map", "mean"] = "cls"
    pre_norm: bool = False  # LayerNorm on the embeddings before the blocks (CLIP's pre_layrnorm)
    patch_bias: bool = False  # bias on the patch embedding (SigLIP: True, CLIP: False)

    def __post_init__(self):
        c = self.encoder
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size ({self.image_size}) must be a positive multiple of patch_size "
                f"({self.patch_size})."
            )
        if self.channels <= 0:
            raise ConfigError(f"channels must be > 0, got {self.channels}.")
        if c.position != "learned":
            raise ConfigError(
                "the ViT adds its positions at the patch embedding: set the encoder's "
                "position='learned' (no RoPE inside the blocks)."
            )
        if c.moe is not None:
            raise ConfigError("MoE blocks are not supported in the vision tower (encoder.moe).")
        if self.position not in ("learned", "sincos"):
            raise ConfigError(f"position must be 'learned' or 'sincos', got {self.position!r}.")
        if self.pooling not in ("cls", "map", "mean"):
            raise ConfigError(f"pooling must be 'cls', 'map' or 'mean', got {self.pooling!r}.")
        if self.position == "sincos" and c.d_model % 4:
            raise ConfigError(f"2-D sin-cos positions need d_model % 4 == 0, got {c.d_model}.")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.pooling == "cls")


def check_images(images, cfg: VisionConfig) -> None:
    """Raise `ImageInputError` naming the problem (works on arrays and tracers: static facts)."""
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    want = (cfg.image_size, cfg.image_size, cfg.channels)
    if len(shape) != 4:
        raise ImageInputError(
            f"images must be [B, H, W, C] = [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), got "
            f"shape {shape}; add a batch axis with images[None] or a channel axis with "
            "images[..., None]."
        )
    if shape[3] != cfg.channels:
        raise ImageInputError(
            f"images have {shape[3]} channels but the vision tower expects {cfg.channels} "
            f"(shape {shape}, NHWC): convert the images (e.g. grayscale <-> RGB) or build the "
            "tower with VisionConfig(channels=...). NCHW input must be transposed to NHWC."
        )
    if shape[1:3] != want[:2]:
        raise ImageInputError(
            f"images are {shape[1]}x{shape[2]} but the vision tower expects "
            f"{want[0]}x{want[1]}: resize them or set VisionConfig(image_size=...)."
        )
    if not np.issubdtype(dtype, np.floating):
        raise ImageInputError(
            f"images must be floating point, got dtype {dtype}: convert uint8 pixels with "
            "lm_jax.data.images.to_float(images) (x / 255, then normalised)."
        )


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions [grid*grid, dim] (MAE / big_vision): half rows, half cols."""
    d4 = dim // 4
    omega = 1.0 / (10000 ** (np.arange(d4, dtype=np.float64) / d4))  # [dim/4]
    y, x = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    oy = y.reshape(-1, 1) * omega[None]  # [P, dim/4]
    ox = x.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], 1).astype(np.float32)


def patchify(images: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major patches, (ph, pw, C) inside."""
    B, H, W, C = images.shape
    x = images.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP): a learned probe attends over the tokens, then
    x + MLP(LN(x)). Projections carry biases (torch nn.MultiheadAttention)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, D]
        cfg = self.cfg
        B, T, D = x.shape
        N = cfg.num_heads
        H = D // N
        init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, "embed"))
        probe = self.param("probe", init, (1, D), cfg.weight_dtype)
        q = jnp.broadcast_to(probe.astype(cfg.compute_dtype)[None], (B, 1, D))
        attn = {n: Dense(D, ("embed", "heads"), cfg, True, name=n) for n in ("q", "k", "v")}
        q = attn["q"](q).reshape(B, 1, N, H)
        k = attn["k"](x).reshape(B, T, N, H)
        v = attn["v"](x).reshape(B, T, N, H)
        out = jax.nn.dot_product_attention(q, k, v).reshape(B, 1, D)
        out = Dense(D, ("heads", "embed"), cfg, True, name="o")(out)
        out = out + MLP(cfg, name="mlp")(Norm(cfg, name="norm")(out))
        return out[:, 0]


class ViT(nn.Module):
    """`apply(v, images [B,H,W,C] float)` -> (pooled [B, D], tokens [B, T, D], final-normed)."""

    cfg: VisionConfig

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True):
        vc, cfg = self.cfg, self.cfg.encoder
        check_images(images, vc)
        p, C, D = vc.patch_size, vc.channels, cfg.d_model
        kernel = self.param(
            "patch_embed_kernel",
            nn.with_logical_partitioning(
                normal_init((p * p * C) ** -0.5), (None, None, None, "embed")
            ),
            (p, p, C, D),
            cfg.weight_dtype,
        )  # HWIO conv kernel (LeCun-normal init), applied with stride p as a matmul over patches
        x = patchify(images.astype(cfg.compute_dtype), p)  # [B, P, p*p*C]
        x = jnp.dot(x, kernel.reshape(p * p * C, D).astype(cfg.compute_dtype))  # [B, P, D]
        if vc.patch_bias:
            bias = self.param(
                "patch_embed_bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                (D,),
                cfg.weight_dtype,
            )
            x = x + bias.astype(cfg.compute_dtype)
        B = x.shape[0]
        if vc.pooling == "cls":
            cls = self.param(
                "cls", nn.with_logical_partitioning(normal_init(cfg.initializer_range), ("embed",)),
                (D,), cfg.weight_dtype,
            )  # fmt: skip
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (B, 1, D)), x], axis=1)
        T = x.shape[1]
        if vc.position == "learned":
            pos = self.param(
                "pos_embed",
                nn.with_logical_partitioning(normal_init(cfg.initializer_range), (None, "embed")),
                (T, D),
                cfg.weight_dtype,
            )
        else:
            pos = jnp.asarray(sincos_2d(vc.grid, D))
            if vc.pooling == "cls":  # the CLS token gets no position
                pos = jnp.concatenate([jnp.zeros((1, D), pos.dtype), pos], axis=0)
        x = x + pos.astype(x.dtype)[None]
        if vc.pre_norm:
            x = Norm(cfg, name="pre_norm")(x)
        x = constrain(x, ACT_NAMES)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        layers = scan_blocks(Block, cfg, deterministic, False, False)  # bidirectional
        x, _ = layers(x, positions, None, None)
        x = Norm(cfg, name="norm")(x)  # [B, T, D]
        if vc.pooling == "cls":
            pooled = x[:, 0]
        elif vc.pooling == "mean":
            pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
        else:
            pooled = MAPHead(cfg, name="head")(x)
        return pooled, x
