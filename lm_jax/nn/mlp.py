"""Feed-forward block: GELU MLP (GPT-2) or gated SwiGLU (Llama)."""

from __future__ import annotations

import flax.linen as nn
import jax

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.layers import Dense

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


class MLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) if gated, else down_proj(act(up_proj(x)))."""

    cfg: ModelConfig
    mlp_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        cfg = self.cfg
        F = self.mlp_dim or cfg.mlp_dim_
        act = ACTIVATIONS[cfg.activation]
        h = Dense(F, ("embed", "mlp"), cfg, cfg.use_bias, name="up_proj")(x)  # [B, T, F]
        if cfg.gated_mlp:
            h = act(Dense(F, ("embed", "mlp"), cfg, cfg.use_bias, name="gate_proj")(x)) * h
        else:
            h = act(h)
        down_std = cfg.initializer_range / (2 * cfg.num_layers) ** 0.5
        return Dense(cfg.d_model, ("mlp", "embed"), cfg, cfg.use_bias, down_std, name="down_proj")(
            h
        )
