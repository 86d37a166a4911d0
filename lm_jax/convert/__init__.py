"""Checkpoint conversion: Hugging Face transformers (`from_hf`, `to_hf`), GGUF (`from_gguf`),
peft LoRA adapters (`lm_jax.convert.peft`)."""

from lm_jax.convert.gguf import from_gguf
from lm_jax.convert.hf import (
    ARCHITECTURES,
    Architecture,
    from_hf,
    hf_model_type,
    register_architecture,
    to_hf,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "from_gguf",
    "from_hf",
    "hf_model_type",
    "register_architecture",
    "to_hf",
]
