"""Text pipeline on grain: tokenize -> pack -> seeded shuffle -> batch, checkpointable.

Packing is concat-then-split: documents (each followed by EOS when the tokenizer has one) are
concatenated and cut into rows of `seq_len + 1` tokens with stride `seq_len`, so every token is
a target exactly once per epoch and nothing is padded except the final row. From the second
epoch on, the cut points shift by a seeded offset in [0, seq_len) per epoch, so repeated epochs
see fresh windows (as nanoGPT's random offsets do) rather than the same rows again. A document that
crosses a row boundary continues in the next row with positions restarting at 0 (its earlier
context is not visible). Within a row, `segment_ids` separate documents; `loss_mask` is 0 where
the target belongs to another document than the input, and on padding.

Batch: inputs, targets, positions, segment_ids [B, T] int32; loss_mask [B, T] float32;
example_ids [B, T] int32 (source document of each input token, -1 = padding).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.data.text_sources import load_texts
from lm_jax.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut into batches."""

    source: str = "shakespeare"  # shakespeare | tinyshakespeare:<path> | file:<glob> | tfds:<name>
    tokenizer: str = "char"  # char | byte | sentencepiece:<bpe|unigram>:<vocab> | dir:<path>
    seq_len: int = 128  # T: tokens per row (inputs)
    batch_size: int = 32  # global batch (rows per step, all processes together)
    seed: int = 0  # shuffle seed (each epoch is a fresh permutation)
    shuffle: bool = True

    def __post_init__(self):
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len must be > 0, got {self.seq_len}")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be > 0, got {self.batch_size}")


def build_tokenizer_for(cfg: DataConfig) -> Tokenizer:
    """Make the tokenizer named by `cfg.tokenizer` (training it on the train split if needed)."""
    from lm_jax.data.char_tokenizer import ByteTokenizer, CharTokenizer
    from lm_jax.data.sp_tokenizer import SentencePieceTokenizer

    spec = cfg.tokenizer
    kind, _, rest = spec.partition(":")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "dir":
        return load_tokenizer(rest)
    if kind == "char":
        texts = [t for s in ("train", "validation") for _, t in load_texts(cfg.source, s)]
        return CharTokenizer.from_texts(texts)
    if kind == "sentencepiece":
        model_type, _, vocab = rest.partition(":")
        if not vocab.isdigit():
            raise TokenizerError(
                f"malformed tokenizer spec {spec!r}: sentencepiece:<bpe|unigram>:<vocab>"
            )
        texts = [t for _, t in load_texts(cfg.source, "train")]
        return SentencePieceTokenizer.train(texts, int(vocab), model_type)
    raise TokenizerError(
        f"unknown tokenizer {spec!r}: use char, byte, sentencepiece:<bpe|unigram>:<vocab> or "
        "dir:<saved tokenizer folder>"
    )


def pack_documents(docs, tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Token stream and document ids (-1 = padding) of all docs, concatenated.

    `rows` is the number of rows of `seq_len + 1` tokens (stride `seq_len`) that cover it; the
    stream is padded so that any row at any offset in [0, seq_len) is in bounds.
    """
    ids, owner = [], []
    for doc_id, text in docs:
        toks = tokenizer.encode(text)
        if tokenizer.eos_id is not None:
            toks = toks + [tokenizer.eos_id]
        ids.append(np.asarray(toks, np.int32))
        owner.append(np.full(len(toks), doc_id, np.int32))
    stream, doc = np.concatenate(ids), np.concatenate(owner)
    if stream.size < 2:
        raise ValueError("the corpus tokenizes to fewer than 2 tokens: nothing to train on")
    rows = max(1, -(-(stream.size - 1) // seq_len))
    pad = rows * seq_len + 1 + seq_len - stream.size
    stream = np.concatenate([stream, np.full(pad, tokenizer.pad_id, np.int32)])
    doc = np.concatenate([doc, np.full(pad, -1, np.int32)])
    return {"tokens": stream, "docs": doc, "rows": np.int64(rows)}


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Where epoch `epoch` starts cutting rows: 0 for the first, then seeded in [0, seq_len)."""
    if epoch == 0:
        return 0
    return int(np.random.default_rng([seed, epoch]).integers(seq_len))


def row_to_example(tokens: np.ndarray, docs: np.ndarray) -> dict[str, np.ndarray]:
    """One packed row [T+1] -> model inputs with positions, segments and loss mask."""
    inp_doc, tgt_doc = docs[:-1], docs[1:]
    start = np.ones_like(inp_doc, bool)
    start[1:] = inp_doc[1:] != inp_doc[:-1]
    segment = np.cumsum(start).astype(np.int32)
    first = np.maximum.accumulate(np.where(start, np.arange(len(start)), 0))
    positions = (np.arange(len(start)) - first).astype(np.int32)
    valid = inp_doc >= 0
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "positions": positions,
        "segment_ids": np.where(valid, segment, 0).astype(np.int32),
        "loss_mask": ((inp_doc == tgt_doc) & valid).astype(np.float32),
        "example_ids": inp_doc,
    }


class _Iterator:
    """A grain iterator yielding numpy batch dicts; `get_state`/`set_state` are JSON-able."""

    def __init__(self, ds):
        self._ds = ds
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)


def make_text_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool | None = None,
):
    """Iterator of local batches (`batch_size // process_count` rows) for `split`.

    Train (default repeat=True): shuffled per epoch with `cfg.seed`, endless. Validation
    (repeat=False): every row once in order; the last batch is padded with loss_mask 0.
    """
    if cfg.batch_size % process_count:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide over {process_count} processes")
    repeat = split == "train" if repeat is None else repeat
    packed = pack_documents(load_texts(cfg.source, split), tokenizer, cfg.seq_len)
    n, T = int(packed["rows"]), cfg.seq_len
    local = cfg.batch_size // process_count
    tokens, docs = packed["tokens"], packed["docs"]

    def row(r: int, offset: int) -> dict[str, np.ndarray]:
        if r >= n:  # padding row of a final validation batch
            return row_to_example(np.zeros(T + 1, np.int32), np.full(T + 1, -1, np.int32))
        lo = r * T + offset
        return row_to_example(tokens[lo : lo + T + 1], docs[lo : lo + T + 1])

    if repeat:
        ds = grain.MapDataset.range(n)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(None).map_with_index(
            lambda i, r: row(int(r), epoch_offset(cfg.seed, i // n, T))
        )
    else:
        total = -(-n // cfg.batch_size) * cfg.batch_size  # pad to whole global batches
        ds = grain.MapDataset.range(total).map(lambda r: row(int(r), 0))
    ds = ds[process_index::process_count].batch(local)
    return _Iterator(ds.to_iter_dataset())
