"""lm_jax: pure-functional Flax language models."""

__version__ = "0.1.0"
