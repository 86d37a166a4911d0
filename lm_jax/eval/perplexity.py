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
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.errors import EvalError  # defined there, re-exported here
from lm_jax.nn.transformer import Transformer
from lm_jax.sharding import batch_sharding, params_shardings, replicated

MODEL_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


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


# --------------------------------------------------------------------------- scoring on device

LogitsFn = Callable  # (params, inputs [B,T], positions [B,T], segment_ids [B,T]) -> logits [B,T,V]


def transformer_logits_fn(cfg: ModelConfig) -> LogitsFn:
    model = Transformer(cfg)

    def fn(params, inputs, positions, segment_ids):
        return model.apply({"params": params}, inputs, positions, segment_ids)

    return fn


def _row_sums(logits_fn, params, batch):
    """Per-row summed NLL and counted tokens: [B], [B] float32."""
    logits = logits_fn(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = logits.astype(jnp.float32)  # [B, T, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]  # [B, T]
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = jnp.where(mask > 0, log_z - tgt, 0.0)  # padding can hold any value (no NaN leaks)
    return jnp.sum(nll * mask, axis=1), jnp.sum(mask, axis=1)


@functools.lru_cache(maxsize=8)
def _jitted(cfg: ModelConfig):
    return jax.jit(functools.partial(_row_sums, transformer_logits_fn(cfg)))


def data_parallel_size(mesh) -> int:
    if mesh is None:
        return 1
    return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]


class Scorer:
    """Sums NLL per row of batches {inputs, targets, positions?, segment_ids?, loss_mask?}.

    With `mesh`, parameters are placed by `lm_jax.sharding.params_shardings` and the batch is
    split over the data axes (rows padded to a multiple of their size with masked rows).
    `logits_fn` replaces the Transformer (any function of ids giving logits; params replicated).
    """

    def __init__(
        self, cfg: ModelConfig | None, params, mesh=None, logits_fn: LogitsFn | None = None
    ):
        if logits_fn is None and cfg is None:
            raise EvalError("Scorer needs a ModelConfig (or an explicit logits_fn)")
        self.cfg, self.mesh = cfg, mesh
        params = nn.unbox(params)
        if logits_fn is None:
            self.fn = _jitted(cfg)
        else:
            self.fn = jax.jit(functools.partial(_row_sums, logits_fn))
        if mesh is not None:
            if logits_fn is None:
                from lm_jax.train.state import abstract_params

                shardings = params_shardings(abstract_params(cfg), mesh)
            else:
                shardings = jax.tree.map(lambda _: replicated(mesh), params)
            params = jax.device_put(params, shardings)
        self.params = params

    def row_sums(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        """(nll [B], tokens [B]) float64 for one batch."""
        batch = complete_batch(batch)
        B = batch["inputs"].shape[0]
        if self.cfg is not None and batch["positions"].size:
            hi = int(batch["positions"].max())
            if hi >= self.cfg.max_len:
                raise EvalError(
                    f"a row reaches position {hi} but the model's max_len is {self.cfg.max_len}: "
                    "use a shorter window / seq_len"
                )
        dp = data_parallel_size(self.mesh)
        pad = (-B) % dp
        if pad:
            batch = {
                k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                for k, v in batch.items()
            }
        if self.mesh is None:
            nll, cnt = self.fn(self.params, {k: jnp.asarray(v) for k, v in batch.items()})
        else:
            sh = batch_sharding(self.mesh, 2, B + pad)
            arrays = {k: jax.device_put(v, sh) for k, v in batch.items()}
            with jax.set_mesh(self.mesh):
                nll, cnt = self.fn(self.params, arrays)
        nll = np.asarray(jax.device_get(nll), np.float64)[:B]
        cnt = np.asarray(jax.device_get(cnt), np.float64)[:B]
        return nll, cnt


def complete_batch(batch: dict) -> dict:
    """numpy copies of the model keys, with default positions/segments/mask filled in."""
    if "inputs" not in batch or "targets" not in batch:
        raise EvalError(f"a batch needs 'inputs' and 'targets', got keys {sorted(batch)}")
    inputs = np.asarray(batch["inputs"], np.int32)
    targets = np.asarray(batch["targets"], np.int32)
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise EvalError(
            f"inputs and targets must both be [B, T], got {inputs.shape} and {targets.shape}"
        )
    B, T = inputs.shape
    out = {"inputs": inputs, "targets": targets}
    out["positions"] = np.asarray(
        batch.get("positions", np.broadcast_to(np.arange(T), (B, T))), np.int32
    )
    out["segment_ids"] = np.asarray(batch.get("segment_ids", np.ones((B, T))), np.int32)
    out["loss_mask"] = np.asarray(batch.get("loss_mask", np.ones((B, T))), np.float32)
    return out


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
) -> PerplexityResult:
    """Perplexity over batches from `lm_jax.data.make_text_dataset` (or any dict batches).

    Bytes (for bits per byte) are `byte_lens[targets] * loss_mask` when `byte_lens` [V] is given
    (see `token_byte_lengths`), or a batch's own "target_bytes" [B, T].
    """
    scorer = scorer or Scorer(cfg, params, mesh, logits_fn)
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
) -> PerplexityResult:
    """Perplexity / bits per byte of texts (each scored on its own) under a window policy.

    window: tokens fed per window (default cfg.max_len); stride: default = window
    (non-overlapping), smaller = HF-style sliding window. Short windows are packed into rows of
    `window` tokens (`pack`); rows are batched `batch_size` at a time, sharded over `mesh`.
    `limit` keeps the first texts, `max_tokens` the first scored tokens (bytes follow).
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
    res = evaluate_batches(cfg, params, batches, mesh=mesh, logits_fn=logits_fn)
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
    from lm_jax.data import load_texts

    docs = load_texts(source, split)
    return perplexity(cfg, params, tokenizer, [t for _, t in docs], **kw)


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for inside running text (0 for specials).

    SentencePiece pieces count their '▁' as a space and '<0xNN>' byte pieces as one byte (plain
    per-token decoding drops a leading space); everything else uses `decode([id])`.
    """
    out = np.zeros((vocab_size,), np.float64)
    sp = getattr(tokenizer, "sp", None)
    for i in range(min(tokenizer.vocab_size, vocab_size)):
        if sp is not None:
            if sp.IsControl(i) or sp.IsUnknown(i):
                continue
            piece = sp.IdToPiece(i)
            out[i] = 1 if sp.IsByte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
            continue
        if i in (tokenizer.bos_id, tokenizer.eos_id):
            continue
        try:
            out[i] = len(tokenizer.decode([i]).encode("utf-8"))
        except Exception:  # noqa: BLE001 - special/control ids may not decode
            out[i] = 0
    return out
