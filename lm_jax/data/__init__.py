"""Tokenizers and text data pipelines (see pipeline.py for the batch contract)."""

from lm_jax.data import byte_tokenizer, char_tokenizer, sp_tokenizer  # noqa: F401 - register kinds
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.data.char_tokenizer import CharTokenizer
from lm_jax.data.config import DataConfig
from lm_jax.data.factory import build_tokenizer, build_tokenizer_for, parse_tokenizer_spec
from lm_jax.data.pipeline import (
    BATCH_KEYS,
    TextIterator,
    TokenStream,
    make_eval_dataset,
    make_text_dataset,
    make_train_dataset,
    tokenize_documents,
)
from lm_jax.data.sources import DataSourceError
from lm_jax.data.sp_tokenizer import SentencePieceTokenizer
from lm_jax.data.streaming import load_texts
from lm_jax.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "CharTokenizer",
    "DataConfig",
    "DataSourceError",
    "SentencePieceTokenizer",
    "TextIterator",
    "TokenStream",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "build_tokenizer_for",
    "load_texts",
    "load_tokenizer",
    "make_eval_dataset",
    "make_text_dataset",
    "make_train_dataset",
    "parse_tokenizer_spec",
    "tokenize_documents",
]
