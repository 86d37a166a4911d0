"""Typed configs and presets."""

from lm_jax.configs.base import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    RopeScaling,
    gpt2_style,
    llama_style,
)

__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "RopeScaling", "gpt2_style", "llama_style"]
