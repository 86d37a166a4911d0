"""Typed configs and presets."""

from lm_jax.configs.base import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    RopeScaling,
    gpt2_style,
    llama_style,
)
from lm_jax.configs.encoder import EncoderConfig, bert_style

__all__ = [
    "ConfigError",
    "EncoderConfig",
    "ModelConfig",
    "MoEConfig",
    "RopeScaling",
    "bert_style",
    "gpt2_style",
    "llama_style",
]
