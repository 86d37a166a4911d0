"""Perplexity and bits per byte, with exact token counting, sharded over a mesh.

Every score is a sum: NLL (nats) over counted target tokens, the count, and the UTF-8 bytes of the
scored text. Perplexity = exp(sum NLL / sum tokens); bits per byte = sum NLL / ln 2 / sum bytes.
Padding rows, padded slots and packed neighbours never change the sums: the per-row sums are
computed on device with the loss mask, returned per row, and added on the host in float64.

Context-window policy for a long text of n tokens t_0..t_{n-1} (`text_windows`): window k feeds
`window` tokens starting at k * stride and predicts the next token at each position; its last
`stride` predictions are counted (all of them in the first window). So every token t_1..t_{n-1}
is scored exactly once, with at least `window - stride` tokens of context: stride = window gives
non-overlapping windows; stride < window is HF's strided sliding window (the transformers
perplexity guide), with exact counts instead of the guide's per-window "- 1" approximation.
With `add_bos` (and a tokenizer BOS) t_0 is scored too, given BOS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.data import load_texts
from lm_jax.scoring import (  # noqa: F401 - re-exported: the scorer lives in lm_jax.scoring
    EvalError,
    LogitsFn,
    Scorer,
    complete_batch,
    data_parallel_size,
    token_byte_lengths,
)


@dataclasses.dataclass
class PerplexityResult:
    """Summed NLL (nats), counted target tokens and UTF-8 bytes of the scored text."""

    nll: float = 0.0
    tokens: float = 0.0
    bytes: float = 0.0
    windows: int = 0

    def __add__(self, other: PerplexityResult) -> PerplexityResult:
        return PerplexityResult(
            self.nll + other.nll,
            self.tokens + other.tokens,
            self.bytes + other.bytes,
            self.windows + other.windows,
        )

    @property
    def loss(self) -> float:
        """Mean NLL per token (nats)."""
        if self.tokens <= 0:
            raise EvalError("no tokens were scored: the dataset/text is empty or too short")
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes > 0 else None

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
            "nll_sum": self.nll,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "windows": self.windows,
        }


def evaluate_batches(
    cfg: ModelConfig | None,
    params,
    batches: Iterable[dict],
    *,
    mesh=None,
    byte_lens: np.ndarray | None = None,
    limit: int | None = None,
    logits_fn: LogitsFn | None = None,
    scorer: Scorer | None = None,
    chunk: int = 0,
) -> PerplexityResult:
    """Perplexity over batches from `lm_jax.data.make_text_dataset` (or any dict batches).

    Bytes (for bits per byte) are `byte_lens[targets] * loss_mask` when `byte_lens` [V] is given
    (see `token_byte_lengths`), or a batch's own "target_bytes" [B, T]. Scored by
    `lm_jax.scoring.Scorer` (`chunk` > 0: the head `chunk` positions at a time).
    """
    scorer = scorer or Scorer(cfg, params, mesh, logits_fn, chunk)
    res = PerplexityResult()
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        nll, cnt = scorer.row_sums(batch)
        nbytes = 0.0
        mask = np.asarray(batch.get("loss_mask", np.ones(np.shape(batch["targets"]))), np.float64)
        if "target_bytes" in batch:
            nbytes = float(np.sum(np.asarray(batch["target_bytes"], np.float64) * mask))
        elif byte_lens is not None:
            nbytes = float(np.sum(byte_lens[np.asarray(batch["targets"])] * mask))
        res = res + PerplexityResult(float(nll.sum()), float(cnt.sum()), nbytes, len(nll))
    if res.tokens <= 0:
        raise EvalError(
            "the dataset yielded no scored tokens (empty dataset, or every loss_mask is 0): "
            "check the data source / split / --limit"
        )
    return res


# --------------------------------------------------------------------------- windows and packing


@dataclasses.dataclass
class Piece:
    """One context window: model inputs, next-token targets and which targets are counted."""

    inputs: np.ndarray  # [n] int32
    targets: np.ndarray  # [n] int32
    mask: np.ndarray  # [n] float32, 1 = counted

    def __len__(self) -> int:
        return len(self.inputs)


def text_windows(ids: Sequence[int], window: int, stride: int | None = None) -> list[Piece]:
    """Windows over one token sequence (module docstring): every token after the first is a
    counted target exactly once."""
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise EvalError(f"need window >= 1 and 1 <= stride <= window, got {window=}, {stride=}")
    ids = np.asarray(ids, np.int32).reshape(-1)
    n = len(ids)
    pieces: list[Piece] = []
    prev_end = 0  # targets at text positions <= prev_end are already counted
    begin = 0
    while prev_end < n - 1:
        end = min(begin + window, n - 1)  # inputs ids[begin:end], targets ids[begin+1:end+1]
        inputs, targets = ids[begin:end], ids[begin + 1 : end + 1]
        target_pos = np.arange(begin + 1, end + 1)
        mask = (target_pos > prev_end).astype(np.float32)
        pieces.append(Piece(inputs, targets, mask))
        prev_end = end
        begin += stride
    return pieces


def pack_pieces(
    pieces: Sequence[Piece], row_len: int, pack: bool = True
) -> list[dict[str, np.ndarray]]:
    """Pieces -> rows of `row_len`: packed greedily in order (segments 1, 2, ... with positions
    restarting), or one piece per row (`pack=False`); the rest of a row is padding (segment 0,
    loss_mask 0)."""
    rows: list[list[Piece]] = []
    fill = row_len + 1
    for p in pieces:
        if len(p) > row_len:
            raise EvalError(f"a window of {len(p)} tokens does not fit rows of {row_len}")
        if pack and fill + len(p) <= row_len:
            rows[-1].append(p)
            fill += len(p)
        else:
            rows.append([p])
            fill = len(p)
    out = []
    for row in rows:
        r = {
            "inputs": np.zeros(row_len, np.int32),
            "targets": np.zeros(row_len, np.int32),
            "positions": np.zeros(row_len, np.int32),
            "segment_ids": np.zeros(row_len, np.int32),
            "loss_mask": np.zeros(row_len, np.float32),
        }
        at = 0
        for seg, p in enumerate(row, start=1):
            sl = slice(at, at + len(p))
            r["inputs"][sl], r["targets"][sl], r["loss_mask"][sl] = p.inputs, p.targets, p.mask
            r["positions"][sl] = np.arange(len(p))
            r["segment_ids"][sl] = seg
            at += len(p)
        out.append(r)
    return out


def batch_rows(rows: Sequence[dict], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Stack rows into batches of `batch_size` (the last one padded with masked rows)."""
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = list(rows[i : i + batch_size])
        while len(chunk) < batch_size:
            chunk.append({k: np.zeros_like(v) for k, v in chunk[0].items()})
        out.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
    return out


def encode_for_scoring(tokenizer, text: str, add_bos: bool) -> tuple[np.ndarray, int]:
    """(token ids, UTF-8 bytes of the scored part of the text).

    Without BOS the first token is context only, so its bytes are not part of the scored text.
    """
    ids = list(tokenizer.encode(text))
    nbytes = len(text.encode("utf-8"))
    if add_bos:
        if tokenizer.bos_id is None:
            raise EvalError("add_bos=True but the tokenizer has no bos_id; pass add_bos=False")
        ids = [tokenizer.bos_id] + ids
    elif ids:
        nbytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
    if len(ids) < 2:
        nbytes = 0
    return np.asarray(ids, np.int32), max(nbytes, 0)


def perplexity(
    cfg: ModelConfig | None,
    params,
    tokenizer,
    texts: str | Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    add_bos: bool = False,
    pack: bool = True,
    mesh=None,
    logits_fn: LogitsFn | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    chunk: int = 0,
) -> PerplexityResult:
    """Perplexity / bits per byte of texts (each scored on its own) under a window policy.

    window: tokens fed per window (default cfg.max_len); stride: default = window
    (non-overlapping), smaller = HF-style sliding window. Short windows are packed into rows of
    `window` tokens (`pack`); rows are batched `batch_size` at a time, sharded over `mesh`.
    `limit` keeps the first texts, `max_tokens` the first scored tokens (bytes follow).
    `chunk` > 0 applies the LM head `chunk` positions at a time (no [B, T, V] logits).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)[:limit] if limit is not None else list(texts)
    if not texts or not any(t for t in texts):
        raise EvalError("no text to score: the dataset is empty")
    if window is None:
        if cfg is None:
            raise EvalError("pass window= when no ModelConfig is given")
        window = cfg.max_len
    if cfg is not None and window > cfg.max_len:
        raise EvalError(f"window {window} exceeds the model's max_len {cfg.max_len}")
    pieces, nbytes, budget = [], 0, max_tokens
    for text in texts:
        ids, b = encode_for_scoring(tokenizer, text, add_bos)
        if budget is not None:
            if budget < 1:
                break
            if len(ids) - 1 > budget:  # keep the first `budget` scored tokens
                ids = ids[: budget + 1]
                b = len(tokenizer.decode(ids[1:]).encode("utf-8"))  # the scored tokens' text
            budget -= len(ids) - 1
        if len(ids) >= 2:
            pieces += text_windows(ids, window, stride)
            nbytes += b
    if not pieces:
        raise EvalError("the texts tokenize to fewer than 2 tokens each: nothing to score")
    batches = batch_rows(pack_pieces(pieces, window, pack), batch_size)
    res = evaluate_batches(cfg, params, batches, mesh=mesh, logits_fn=logits_fn, chunk=chunk)
    return dataclasses.replace(res, bytes=float(nbytes), windows=len(pieces))


def dataset_perplexity(
    cfg: ModelConfig,
    params,
    tokenizer,
    source: str,
    split: str = "validation",
    **kw,
) -> PerplexityResult:
    """`perplexity` of every document of an `lm_jax.data` text source (e.g.
    'tinyshakespeare:<path>'), each document scored on its own."""
    docs = load_texts(source, split)
    return perplexity(cfg, params, tokenizer, [t for _, t in docs], **kw)
