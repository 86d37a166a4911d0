"""Evaluation: perplexity / bits per byte, generation metrics, classification, tasks."""

from lm_jax.eval.perplexity import (
    EvalError,
    PerplexityResult,
    Scorer,
    dataset_perplexity,
    evaluate_batches,
    pack_pieces,
    perplexity,
    text_windows,
    token_byte_lengths,
)

__all__ = [
    "EvalError",
    "PerplexityResult",
    "Scorer",
    "dataset_perplexity",
    "evaluate_batches",
    "pack_pieces",
    "perplexity",
    "text_windows",
    "token_byte_lengths",
]
