"""Tokenizers and text data pipelines."""

from lm_jax.data import char_tokenizer, sp_tokenizer  # noqa: F401 - register tokenizer kinds
from lm_jax.data.text_pipeline import (
    DataConfig,
    build_tokenizer_for,
    make_text_dataset,
    pack_documents,
    row_to_example,
)
from lm_jax.data.text_sources import DataSourceError, load_texts
from lm_jax.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "DataConfig",
    "DataSourceError",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer_for",
    "load_texts",
    "load_tokenizer",
    "make_text_dataset",
    "pack_documents",
    "row_to_example",
]
