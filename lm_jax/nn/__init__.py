"""Flax linen modules."""

from lm_jax.nn.attention import Attention, LayerCache, make_attention_mask
from lm_jax.nn.encoder import Encoder, EncoderOutput
from lm_jax.nn.layers import Dense, Embed, Norm
from lm_jax.nn.mlp import MLP
from lm_jax.nn.transformer import Block, Transformer, init_cache

__all__ = [
    "Attention",
    "Block",
    "Dense",
    "Embed",
    "Encoder",
    "EncoderOutput",
    "LayerCache",
    "MLP",
    "Norm",
    "Transformer",
    "init_cache",
    "make_attention_mask",
]
