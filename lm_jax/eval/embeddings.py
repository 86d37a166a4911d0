"""Sentence embeddings from a BERT-family encoder and a small semantic search over them.

`embed_sentences(cfg, params, tokenizer, texts)`: tokenize with the tokenizer's template ([CLS]
... [SEP]), run `lm_jax.nn.encoder.Encoder` in length-sorted, padded batches, mean-pool the real
tokens and L2-normalise (all-MiniLM-L6-v2 / sentence-transformers' `Pooling(mean)` +
`Normalize`). `semantic_search(queries, corpus, k)`: top-k corpus rows by cosine similarity.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from lm_jax.configs.encoder import EncoderConfig
from lm_jax.errors import EvalError
from lm_jax.nn.encoder import Encoder, sentence_embedding
from lm_jax.utils import round_up

LENGTH_BUCKET = 16  # padded lengths are multiples of this (fewer recompiles)
_HEAD_PARAMS = ("pooler", "mlm_head", "classifier")


def encode_texts(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens. `max_tokens`: longer encodings keep their
    first max_tokens - 1 ids and their last one (the [SEP] of a single-sentence BERT template,
    as transformers' truncation); None: no truncation (the encoder rejects what is too long)."""
    out = []
    for text in texts:
        ids = list(tokenizer.encode(text))
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[: max_tokens - 1] + ids[-1:]
        out.append(ids)
    return out


@functools.lru_cache(maxsize=8)
def _embed_fn(cfg: EncoderConfig):
    model = Encoder(cfg.replace(head="none", pooler=False))

    @jax.jit
    def fn(params, tokens, mask):  # [B, T] -> [B, D] float32
        out = model.apply({"params": params}, tokens, attention_mask=mask)
        return sentence_embedding(out.hidden_states, mask)

    return fn


def embed_token_ids(
    cfg: EncoderConfig, params, ids: Sequence[Sequence[int]], *, batch_size: int = 32
) -> np.ndarray:
    """Normalised mean-pooled embeddings [N, D] float32 of token-id lists (any lengths up to
    max_position_embeddings), in length-sorted batches padded with `cfg.pad_token_id`."""
    if not ids:
        raise EvalError("no texts to embed.")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}.")
    params = {k: v for k, v in params.items() if k not in _HEAD_PARAMS}
    fn, P = _embed_fn(cfg), cfg.model.max_len
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), cfg.model.d_model), np.float32)
    for s in range(0, len(ids), batch_size):
        rows = order[s : s + batch_size]
        longest = max(len(ids[i]) for i in rows)
        T = longest if longest > P else min(round_up(max(longest, 1), LENGTH_BUCKET), P)
        tokens = np.full((batch_size, T), cfg.pad_token_id, np.int32)
        mask = np.zeros((batch_size, T), np.int32)
        for j, i in enumerate(rows):
            tokens[j, : len(ids[i])] = ids[i]
            mask[j, : len(ids[i])] = 1
        mask[len(rows) :, 0] = 1  # filler rows: one token, so nothing divides by zero
        out[rows] = np.asarray(fn(params, tokens, mask))[: len(rows)]
    return out


def embed_sentences(
    cfg: EncoderConfig,
    params,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> np.ndarray:
    """Sentence embeddings [N, D] float32, unit norm (see the module docstring). `max_tokens`:
    truncate longer encodings (all-MiniLM-L6-v2 was trained with 256); see `encode_texts`."""
    return embed_token_ids(
        cfg, params, encode_texts(tokenizer, texts, max_tokens), batch_size=batch_size
    )


def semantic_search(queries, corpus, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows per query by cosine similarity: queries [Q, D], corpus [N, D] ->
    (scores [Q, k] float32, ids [Q, k] int64), best first (ties: lower id first)."""
    q = np.asarray(queries, np.float32)
    c = np.asarray(corpus, np.float32)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise EvalError(f"need queries [Q, D] and corpus [N, D], got {q.shape} and {c.shape}.")
    if not 1 <= k <= c.shape[0]:
        raise EvalError(f"k must be in [1, {c.shape[0]}] (the corpus size), got {k}.")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    scores = q @ c.T  # [Q, N]
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


__all__ = [
    "embed_sentences",
    "embed_token_ids",
    "encode_texts",
    "semantic_search",
]
