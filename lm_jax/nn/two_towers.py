"""Image-text models: CLIP/SigLIP-style two towers, and a LLaVA-style prefix captioner.

Two towers: `ViT` image tower + text tower (the LM's embeddings and blocks, causal or
bidirectional, EOS / last-token / mean pooling) -> linear projections -> L2-normalised
embeddings; a learnable temperature `logit_scale` (log of the multiplier, clipped at
`max_logit_scale` as in CLIP) and, for the sigmoid loss, a learnable `logit_bias`.

Captioner: ViT tokens -> projector -> prefix embeddings for the decoder `Transformer`
(`prefix_embeds`), trained with next-token loss on the caption; decoding is
`lm_jax.generate.generate` with the image prefix (`lm_jax.generate.generate_with_prefix`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.nn.layers import Dense, Embed, Norm, normal_init
from lm_jax.nn.scan import scan_blocks
from lm_jax.nn.transformer import ACT_NAMES, Block, Transformer
from lm_jax.nn.vision import VisionConfig, ViT
from lm_jax.sharding import constrain


class TextInputError(ValueError):
    """Caption tokens do not fit the text tower / decoder (length, rank, mask)."""


# --------------------------------------------------------------------------- text tower


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Text tower: `model` (vocab, width, depth, context = max_len, positions, norm, act)."""

    model: ModelConfig = ModelConfig(
        vocab_size=64, d_model=64, num_layers=2, num_heads=4, max_len=32, norm="layernorm",
        activation="gelu_tanh", gated_mlp=False, use_bias=True, position="learned",
    )  # fmt: skip
    causal: bool = True  # CLIP: causal; SigLIP / BERT-like: False
    pooling: Literal["eos", "last", "mean"] = "eos"
    eos_id: int | None = None  # eos pooling: first position holding eos_id, else last valid token

    def __post_init__(self):
        if self.pooling not in ("eos", "last", "mean"):
            raise ConfigError(f"text pooling must be eos, last or mean, got {self.pooling!r}.")
        if self.model.moe is not None:
            raise ConfigError("MoE blocks are not supported in the text tower.")
        if self.eos_id is not None and not 0 <= self.eos_id < self.model.vocab_size:
            raise ConfigError(
                f"eos_id {self.eos_id} is outside the vocab [0, {self.model.vocab_size})."
            )


def check_text(tokens, mask, max_len: int, what: str = "text tower") -> None:
    """Static checks of caption tokens [B, T] (and mask [B, T]) against the context length."""
    shape = tuple(tokens.shape)
    if len(shape) != 2:
        raise TextInputError(f"caption tokens must be [B, T] int ids, got shape {shape}.")
    if not np.issubdtype(np.dtype(tokens.dtype), np.integer):
        raise TextInputError(f"caption tokens must be integer ids, got dtype {tokens.dtype}.")
    if shape[1] > max_len:
        raise TextInputError(
            f"captions of {shape[1]} tokens are longer than the {what}'s context of {max_len} "
            f"tokens: truncate them (e.g. tokenize with max_len={max_len}) or build the model "
            "with a larger max_len."
        )
    if mask is not None and tuple(mask.shape) != shape:
        raise TextInputError(f"mask shape {tuple(mask.shape)} != tokens shape {shape}.")


def pool_text(x, tokens, mask, pooling: str, eos_id: int | None):
    """x [B, T, D] -> [B, D]: at the first eos_id (else the last valid token), last, or mean."""
    B, T, _ = x.shape
    valid = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0).astype(jnp.int32)  # [B]
    if pooling == "mean":
        w = valid.astype(jnp.float32)[..., None]
        return (jnp.sum(x.astype(jnp.float32) * w, 1) / jnp.maximum(w.sum(1), 1.0)).astype(x.dtype)
    idx = last
    if pooling == "eos" and eos_id is not None:
        is_eos = (tokens == eos_id) & valid
        idx = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), last)
    return jnp.take_along_axis(x, idx[:, None, None].astype(jnp.int32), axis=1)[:, 0]


class TextTower(nn.Module):
    """tokens [B, T] (mask [B, T], True = token) -> (pooled [B, D], hidden [B, T, D]).

    Params are named as the decoder's (`embed_tokens`, `embed_positions`, `layers`, `norm`),
    so an LM checkpoint's blocks can initialise it.
    """

    cfg: TextConfig

    @nn.compact
    def __call__(self, tokens, mask=None, deterministic: bool = True):
        tc, cfg = self.cfg, self.cfg.model
        check_text(tokens, mask, cfg.max_len)
        B, T = tokens.shape
        x = Embed(cfg.vocab_size, cfg, name="embed_tokens")(tokens)  # [B, T, D]
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if cfg.position == "learned":
            wpe = self.param(
                "embed_positions",
                nn.with_logical_partitioning(normal_init(0.01), (None, "embed")),
                (cfg.max_len, cfg.d_model),
                cfg.weight_dtype,
            )
            x = x + wpe[:T].astype(cfg.compute_dtype)[None]
        x = constrain(x, ACT_NAMES)
        segments = None if mask is None else mask.astype(jnp.int32)  # padding = segment 0
        layers = scan_blocks(Block, cfg, deterministic, False, tc.causal)
        x, _ = layers(x, positions, segments, None)
        x = Norm(cfg, name="norm")(x)
        return pool_text(x, tokens, mask, tc.pooling, tc.eos_id), x


# --------------------------------------------------------------------------- two towers


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 64  # E, the shared embedding width
    image_proj: bool = True  # False: the pooled image features are the embedding (SigLIP)
    text_proj_bias: bool = False  # SigLIP's text head has a bias
    loss: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float = math.log(1 / 0.07)  # log of the multiplier (SigLIP: log 10)
    init_logit_bias: float = -10.0  # sigmoid loss only
    max_logit_scale: float = 100.0  # CLIP clips the multiplier at 100

    def __post_init__(self):
        if self.loss not in ("clip", "siglip"):
            raise ConfigError(f"loss must be 'clip' or 'siglip', got {self.loss!r}.")
        if self.embed_dim <= 0:
            raise ConfigError(f"embed_dim must be > 0, got {self.embed_dim}.")
        if not self.image_proj and self.vision.encoder.d_model != self.embed_dim:
            raise ConfigError(
                "image_proj=False needs the vision width "
                f"({self.vision.encoder.d_model}) to equal embed_dim ({self.embed_dim})."
            )
        if self.max_logit_scale <= 0:
            raise ConfigError("max_logit_scale must be > 0.")


def l2_normalize(x, eps: float = 1e-12):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def clipped_scale(log_scale, max_scale: float):
    """exp(log_scale) clipped at max_scale (CLIP: 100); no gradient past the clip."""
    return jnp.exp(jnp.minimum(log_scale.astype(jnp.float32), math.log(max_scale)))


class TwoTowers(nn.Module):
    """`apply(v, images [B,H,W,C], tokens [B,T], mask)` -> dict of image_embeds, text_embeds
    (L2-normalised, float32), logit_scale (the clipped multiplier) and logit_bias (0 for CLIP).
    Methods `encode_image(images)` / `encode_text(tokens, mask)` give the normalised embeddings."""

    cfg: TwoTowerConfig

    def setup(self):
        c = self.cfg
        self.vision = ViT(c.vision)
        self.text = TextTower(c.text)
        if c.image_proj:
            self.image_proj = Dense(
                c.embed_dim, ("embed", None), c.vision.encoder, False,
                c.vision.encoder.d_model**-0.5,
            )  # fmt: skip
        tm = c.text.model
        self.text_proj = Dense(c.embed_dim, ("embed", None), tm, c.text_proj_bias, tm.d_model**-0.5)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.init_logit_scale), (), jnp.float32
        )
        if c.loss == "siglip":
            self.logit_bias = self.param(
                "logit_bias", nn.initializers.constant(c.init_logit_bias), (), jnp.float32
            )

    def encode_image(self, images, deterministic: bool = True, normalize: bool = True):
        pooled, _ = self.vision(images, deterministic)
        z = self.image_proj(pooled) if self.cfg.image_proj else pooled
        return l2_normalize(z) if normalize else z.astype(jnp.float32)

    def encode_text(self, tokens, mask=None, deterministic: bool = True, normalize: bool = True):
        pooled, _ = self.text(tokens, mask, deterministic)
        z = self.text_proj(pooled)
        return l2_normalize(z) if normalize else z.astype(jnp.float32)

    def temperature(self):
        """(scale, bias): the clipped multiplier and the sigmoid bias (0 for CLIP)."""
        scale = clipped_scale(self.logit_scale, self.cfg.max_logit_scale)
        bias = self.logit_bias if self.cfg.loss == "siglip" else jnp.zeros((), jnp.float32)
        return scale, bias

    def __call__(self, images, tokens, mask=None, deterministic: bool = True):
        scale, bias = self.temperature()
        return {
            "image_embeds": self.encode_image(images, deterministic),  # [B, E]
            "text_embeds": self.encode_text(tokens, mask, deterministic),  # [B, E]
            "logit_scale": scale,
            "logit_bias": bias,
        }


# --------------------------------------------------------------------------- captioner


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    vision: VisionConfig = VisionConfig()
    decoder: ModelConfig = ModelConfig(
        vocab_size=64, d_model=64, num_layers=2, num_heads=4, max_len=64, position="learned"
    )  # max_len covers prefix (vision tokens) + caption
    projector: Literal["linear", "mlp"] = "mlp"  # LLaVA-1.5: 2-layer GELU MLP

    def __post_init__(self):
        if self.projector not in ("linear", "mlp"):
            raise ConfigError(f"projector must be 'linear' or 'mlp', got {self.projector!r}.")
        if self.decoder.moe is not None:
            raise ConfigError(
                "the captioner's decoder is a Transformer (MoE layers run), but its training "
                "loss (lm_jax.train.image_text.caption_loss_fn) does not add the MoE auxiliary "
                "losses: use a dense decoder (decoder.moe=None)."
            )
        if self.decoder.max_len <= self.num_prefix:
            raise ConfigError(
                f"decoder.max_len ({self.decoder.max_len}) must exceed the {self.num_prefix} "
                "image prefix tokens: raise it to fit prefix + caption."
            )

    @property
    def num_prefix(self) -> int:
        return self.vision.num_tokens


class Captioner(nn.Module):
    """`apply(v, images, tokens [B, T])` -> next-token logits [B, T, V] at the caption positions
    (the image prefix comes first). Params: `vision`, `projector_in` (mlp), `projector_out`,
    `lm` (the decoder: a `Transformer`, fed the projected image tokens as `prefix_embeds`)."""

    cfg: CaptionerConfig

    def setup(self):
        c = self.cfg
        self.vision = ViT(c.vision)
        D = c.decoder.d_model
        if c.projector == "mlp":
            self.projector_in = Dense(D, ("embed", "mlp"), c.decoder, True)
        self.projector_out = Dense(D, ("mlp", "embed"), c.decoder, True)
        self.lm = Transformer(c.decoder)

    def prefix(self, images, deterministic: bool = True):
        """images -> prefix embeddings [B, P, D_lm]."""
        _, h = self.vision(images, deterministic)  # [B, P, D_v]
        if self.cfg.projector == "mlp":
            h = jax.nn.gelu(self.projector_in(h), approximate=False)
        return self.projector_out(h)

    def __call__(self, images, tokens, deterministic: bool = True):
        P = self.cfg.num_prefix
        check_text(tokens, None, self.cfg.decoder.max_len - P, "decoder (after the image prefix)")
        prefix = self.prefix(images, deterministic)
        logits = self.lm(tokens, deterministic=deterministic, prefix_embeds=prefix)
        return logits[:, P:]
