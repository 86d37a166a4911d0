"""Text pipeline on grain: tokenize -> pack -> seeded shuffle -> batch; checkpointable iterators.

Packing (concat-then-split, the only policy): the documents of a split are tokenized once
(cached in memory per tokenizer), each followed by EOS when the tokenizer has one, and
concatenated into one stream of N tokens. Row r holds the T + 1 stream tokens starting at
`r * T` (T = seq_len): inputs are the first T, targets the last T. There are `ceil(N / T)` rows
per epoch; each stream token is an input exactly once per epoch, nothing is padded except the
tail of the last row, and no document is dropped. A document longer than what is left of a row
continues in the next row ("split documents", counted in `iterator.stats`); there its
positions restart at 0, since attention cannot see the earlier part. From the second epoch on
(with `epoch_offsets`), the cut points move by a seeded offset in [0, T) and the stream is read
circularly, so later epochs see fresh windows (as nanoGPT's random offsets do) and still every
token once. Rows are shuffled per epoch (grain's `MapDataset.shuffle` reseeds each epoch).

Batch dict (numpy, local batch B = batch_size // process_count rows):
  inputs      [B, T] int32    token ids (pad_id on padding)
  targets     [B, T] int32    next token of each input (pad_id on padding)
  positions   [B, T] int32    position within the document's piece in this row, from 0
  segment_ids [B, T] int32    1, 2, ... per document piece within the row; 0 = padding
  loss_mask   [B, T] float32  1 where targets[t] is the real next token of the same document
                              (0 on padding, across document boundaries, and at the end of
                              the stream, so a document's first token is never a target)
  example_ids [B, T] int32    source example id of each input token; -1 = padding

Training iterators repeat forever; evaluation iterators (`make_eval_dataset`) cover the split
once in stream order, the last global batch padded with loss_mask 0 rows; their `total_bytes` /
`doc_bytes` give the UTF-8 size of the split for bits per byte = sum(nats) / ln 2 / total_bytes.

Per process: global row g of the global batch k (g = k * batch_size + j) goes to process
`j % process_count`, so processes read disjoint rows whose union is the global batch.
Iterator state is {"next_batch": k, ...} (JSON); `set_state` restarts grain at batch k, which is
exact (every batch is a pure function of its index), also with `num_workers` > 0.
"""

from __future__ import annotations

import dataclasses
import weakref

import grain
import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.data.config import DataConfig
from lm_jax.data.sources import DataSourceError
from lm_jax.data.streaming import StreamIterator, is_lazy, load_texts, make_stream_dataset
from lm_jax.data.tokenizer import Tokenizer, TokenizerError

STATE_VERSION = 1
ENDLESS = 2**62  # batches of a training iterator (grain's lengths must fit in an index)
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "example_ids")


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A split's documents tokenized and concatenated (each + EOS when the tokenizer has one)."""

    tokens: np.ndarray  # [N] int32 token ids
    owner: np.ndarray  # [N] int32 example id of each token
    doc_bytes: dict  # example id -> UTF-8 bytes of the document's text
    doc_tokens: dict  # example id -> tokens of the document (EOS included)

    @property
    def size(self) -> int:
        return int(self.tokens.size)

    def num_rows(self, seq_len: int) -> int:
        return -(-self.size // seq_len)

    def split_documents(self, seq_len: int) -> int:
        """Documents whose tokens fall in more than one row (first epoch's cut points)."""
        starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        ends = np.r_[starts[1:], self.size] - 1
        return int(np.sum(starts // seq_len != ends // seq_len))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenize_documents(docs, tokenizer: Tokenizer) -> TokenStream:
    """Tokenize `(example_id, text)` documents into one stream."""
    ids, owner, nbytes, ntok = [], [], {}, {}
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], np.int32)
    for doc_id, text in docs:
        toks = np.asarray(tokenizer.encode_array(text), np.int32)
        if eos is not None:
            toks = np.concatenate([toks, eos])
        if doc_id in nbytes:
            raise DataSourceError(f"example id {doc_id} appears twice in the source")
        if toks.size == 0:
            continue
        ids.append(toks)
        owner.append(np.full(toks.size, doc_id, np.int32))
        nbytes[doc_id] = len(text.encode("utf-8"))
        ntok[doc_id] = int(toks.size)
    if not ids or sum(a.size for a in ids) < 2:
        raise DataSourceError("the corpus tokenizes to fewer than 2 tokens: nothing to train on")
    return TokenStream(np.concatenate(ids), np.concatenate(owner), nbytes, ntok)


def token_stream(cfg: DataConfig, tokenizer: Tokenizer, split: str) -> TokenStream:
    """`tokenize_documents(load_texts(...))`, cached per tokenizer object, source and split."""
    key = (cfg.source, split, cfg.val_fraction)
    per_tok = _CACHE.setdefault(tokenizer, {})
    if key not in per_tok:
        stream = tokenize_documents(
            load_texts(cfg.source, split, val_fraction=cfg.val_fraction), tokenizer
        )
        check_token_range(stream, tokenizer)
        per_tok[key] = stream
    return per_tok[key]


def check_token_range(stream: TokenStream, tokenizer: Tokenizer) -> None:
    """TokenizerError unless every token id and the pad id are in [0, vocab_size)."""
    V = tokenizer.vocab_size
    if not 0 <= int(tokenizer.pad_id) < V:
        raise TokenizerError(
            f"pad id {tokenizer.pad_id} is outside the vocabulary [0, {V}); padding would index "
            "outside the embedding. Fix the tokenizer's pad_id."
        )
    bad = np.flatnonzero((stream.tokens < 0) | (stream.tokens >= V))
    if bad.size:
        i = int(bad[0])
        raise TokenizerError(
            f"the tokenizer produced token id {int(stream.tokens[i])} (example id "
            f"{int(stream.owner[i])}), outside its vocabulary [0, {V}); {bad.size} tokens in all. "
            "The tokenizer is inconsistent: rebuild it (or fix its vocab_size)."
        )


def epoch_offset(seed: int, epoch: int, seq_len: int, enabled: bool = True) -> int:
    """Where epoch `epoch` starts cutting rows: 0 for the first, then seeded in [0, seq_len)."""
    if epoch == 0 or not enabled:
        return 0
    return int(np.random.default_rng([seed, epoch]).integers(seq_len))


class RowMaker:
    """Row r of an epoch cut at `offset` -> one example of the batch dict (picklable)."""

    def __init__(self, stream: TokenStream, seq_len: int, pad_id: int, num_rows: int):
        self.tokens, self.owner = stream.tokens, stream.owner
        self.T, self.pad_id, self.num_rows = seq_len, int(pad_id), num_rows

    def __call__(self, r: int, offset: int = 0) -> dict[str, np.ndarray]:
        T, N = self.T, self.tokens.size
        j = np.arange(T + 1)
        valid = (r * T + j < N) & (r < self.num_rows)  # [T+1] inside this epoch's N tokens
        idx = (offset + r * T + j) % N  # [T+1] stream index (circular)
        tok = self.tokens[idx]
        own = np.where(valid, self.owner[idx], -1)
        in_valid, in_own = valid[:-1], own[:-1]
        start = np.ones(T, bool)  # a new document piece starts here
        start[1:] = (in_own[1:] != in_own[:-1]) | (idx[1:-1] == 0)
        seg = np.cumsum(start)
        first = np.maximum.accumulate(np.where(start, np.arange(T), 0))
        # The target is real whenever the input is: it may lie past this epoch's N (wrapped).
        same_doc = (self.owner[idx[1:]] == in_own) & (idx[1:] != 0)
        return {
            "inputs": np.where(in_valid, tok[:-1], self.pad_id).astype(np.int32),
            "targets": np.where(in_valid, tok[1:], self.pad_id).astype(np.int32),
            "positions": np.where(in_valid, np.arange(T) - first, 0).astype(np.int32),
            "segment_ids": np.where(in_valid, seg, 0).astype(np.int32),
            "loss_mask": (in_valid & same_doc).astype(np.float32),
            "example_ids": in_own.astype(np.int32),
        }


class _TrainRow:
    """Global row index i (rows repeated over epochs) and its shuffled row id -> example."""

    def __init__(self, rows: RowMaker, seed: int, epoch_offsets: bool):
        self.rows, self.seed, self.epoch_offsets = rows, seed, epoch_offsets

    def __call__(self, i: int, r: int) -> dict[str, np.ndarray]:
        epoch = int(i) // self.rows.num_rows
        off = epoch_offset(self.seed, epoch, self.rows.T, self.epoch_offsets)
        return self.rows(int(r), off)


class _EvalRow:
    def __init__(self, rows: RowMaker):
        self.rows = rows

    def __call__(self, r: int) -> dict[str, np.ndarray]:
        return self.rows(int(r), 0)  # rows past the end come back as all-padding rows


class _BatchAt:
    """Batch index k -> batch k of a grain MapDataset of batches (random access)."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        return self.batches[int(k)]


class TextIterator:
    """Iterator of batch dicts over a grain `MapDataset` of batches; JSON-able resumable state."""

    def __init__(
        self,
        batches,
        *,
        num_workers: int,
        fingerprint: dict,
        stats: dict,
        stream: TokenStream,
        num_batches: int | None,
    ):
        self._batches = batches  # grain MapDataset: element k = local batch k
        self._num_workers = num_workers
        self._fingerprint = fingerprint
        self._next = 0
        self._it = None
        self.stats = stats  # documents, tokens, rows, split_documents, bytes of the split
        self.doc_bytes = dict(stream.doc_bytes)  # example id -> UTF-8 bytes
        self.total_bytes = int(sum(stream.doc_bytes.values()))  # UTF-8 bytes of the split
        self.num_batches = num_batches  # batches per pass (eval), None = endless (train)

    def _start(self):
        self.close()
        end = self.num_batches if self.num_batches is not None else ENDLESS
        ds = grain.MapDataset.range(self._next, end).map(_BatchAt(self._batches))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
        if self._num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults here)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self._next += 1
        if self._num_workers > 0:  # plain arrays, not views of grain's shared memory blocks
            batch = {k: np.array(v) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "next_batch": self._next, **self._fingerprint}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a data iterator state of version {STATE_VERSION}: {state!r}")
        diff = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
        if diff:
            raise ConfigError(
                "the saved data iterator state belongs to a different data set-up "
                f"(field: (saved, now) = {diff}); resume with the original data config"
            )
        self._next = int(state["next_batch"])
        self._it = None

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def _local_batch(cfg: DataConfig, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size {cfg.batch_size} must be divisible by the {process_count} processes"
        )
    return cfg.batch_size // process_count


def _prepare(cfg, tokenizer, split, process_index, process_count):
    local = _local_batch(cfg, process_index, process_count)
    stream = token_stream(cfg, tokenizer, split)
    n = stream.num_rows(cfg.seq_len)
    rows = RowMaker(stream, cfg.seq_len, tokenizer.pad_id, n)
    stats = {
        "documents": len(stream.doc_bytes),
        "tokens": stream.size,
        "rows": n,
        "split_documents": stream.split_documents(cfg.seq_len),
        "bytes": int(sum(stream.doc_bytes.values())),
    }
    fingerprint = {
        "split": split,
        "source": cfg.source,
        "tokens": stream.size,
        "vocab_size": tokenizer.vocab_size,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "process_index": process_index,
        "process_count": process_count,
    }
    return local, stream, rows, stats, fingerprint


def make_train_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str = "train",
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> TextIterator:
    """Endless iterator of local training batches: rows shuffled per epoch with `cfg.seed`."""
    local, stream, rows, stats, fp = _prepare(cfg, tokenizer, split, process_index, process_count)
    fp.update(seed=cfg.seed, shuffle=cfg.shuffle, epoch_offsets=cfg.epoch_offsets)
    ds = grain.MapDataset.range(rows.num_rows)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(None).map_with_index(_TrainRow(rows, cfg.seed, cfg.epoch_offsets))
    ds = ds[process_index::process_count].batch(local)
    return TextIterator(
        ds,
        num_workers=cfg.num_workers,
        fingerprint=fp,
        stats=stats,
        stream=stream,
        num_batches=None,
    )


def make_eval_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str = "validation",
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> TextIterator:
    """One pass over `split` in stream order: every token is an input exactly once; the last
    global batch is completed with all-padding rows (loss_mask 0). Every process gets the same
    number of batches (`iterator.num_batches`)."""
    local, stream, rows, stats, fp = _prepare(cfg, tokenizer, split, process_index, process_count)
    num_batches = -(-rows.num_rows // cfg.batch_size)
    ds = grain.MapDataset.range(num_batches * cfg.batch_size).map(_EvalRow(rows))
    ds = ds[process_index::process_count].batch(local)
    return TextIterator(
        ds,
        num_workers=cfg.num_workers,
        fingerprint=fp,
        stats=stats,
        stream=stream,
        num_batches=num_batches,
    )


def make_text_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool | None = None,
) -> TextIterator | StreamIterator:
    """Local batches of `split`: training style (shuffled, endless) when `repeat` (the default
    for 'train'), else one evaluation pass (the default for 'validation').

    Lazy sources (stream:, stream_lines:, array_record:, tfds:, tfds_dir:, mix:) are packed from
    a stream of documents (lm_jax/data/streaming.py: same batch dict and packing, resumable
    state; nothing holds the split in memory); the others from the in-memory token stream."""
    repeat = split == "train" if repeat is None else repeat
    if is_lazy(cfg.source):
        return make_stream_dataset(
            cfg,
            tokenizer,
            split,
            process_index=process_index,
            process_count=process_count,
            repeat=repeat,
        )
    make = make_train_dataset if repeat else make_eval_dataset
    return make(cfg, tokenizer, split, process_index=process_index, process_count=process_count)
