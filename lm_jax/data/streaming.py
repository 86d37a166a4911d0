"""Lazy (streamed) text sources, weighted mixtures and the streaming packer.

Nothing here holds a split in memory: documents are read unit by unit, where a unit is
- a byte range ("block") of a text file for `stream:` / `stream_lines:` (read with seek + read,
  not mmap, so file pages do not count in the process's RSS), or
- one record of an array_record file (`array_record:`) or a tfds data source (`tfds:`,
  `tfds_dir:`), read through grain / tfds random access.

File blocks: each file is cut into a train part (head) and a validation part (the last
`val_fraction` of its bytes, default 5%, cut at a document separator), so the held-out slice is
deterministic. Each part is cut into blocks of about `block_bytes` (default 1 MiB); block i
starts at the first separator after its nominal start `i * block_bytes` (searched in a 64 KiB
window; without one there, at the next newline, else at the next UTF-8 character start).
`stream:` documents are blank-line separated paragraphs (as `paragraphs:`), `stream_lines:`
documents are non-empty lines; a document is cut at a block boundary only when it has no
separator in the window.

Training order (`DocStream`): per epoch the units are permuted with the seed (grain's lazy
index shuffle, no permutation array), process p of P reads units `perm[p::P]` (disjoint slices
whose union is the epoch), and the documents of a unit are shuffled with (seed, epoch, unit).
A position is (epoch, k = index in this process's slice, d = document index in the unit).

Packing (`Packer`) is the in-memory pipeline's concat-then-split over the document stream: each
document + EOS is appended to a token stream; a row holds the T + 1 tokens from its start and
the next row starts T tokens later, positions restart at each document piece, loss_mask is 0
across document boundaries. Its state is the position of the document under the next row's
start plus the token offset there, so resuming re-reads one document and is exact.

Mixtures (`mix:0.7*stream:/a.txt,0.3*tfds:name`): each source has its own packer; every local
batch takes its rows from source c in proportion to weight w_c (cumulative rounding over
batches, so the shares are exact to one row), placed in an order shuffled with
(seed, process, batch). State: the batch counter and each source's packer state.

Evaluation streams the validation split once, in order (mixtures: each source's validation split
in turn); every process reads the whole stream and keeps rows j % P == p of each global batch,
so all processes see the same number of batches; the last batch is padded with loss_mask-0
rows. `total_bytes` is the UTF-8 size of the split's documents (counted on the pass, or by a
separate lazy scan if asked before the pass ends).

Differences from the in-memory pipeline: `stats` has None for documents/tokens/rows (unknown
until streamed; "bytes" and "units" are known), `num_batches` is None, there is no `doc_bytes`,
`epoch_offsets` and `num_workers` are not used (rows are made in this process, by a background
thread that prepares `prefetch` = 2 batches ahead; `get_state` is the state after the last batch
handed out, so prefetching does not change what a resume sees), and
`example_ids` of file documents are a stable 31-bit hash of (block, document index).
"""

from __future__ import annotations

import copy
import weakref

import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.data.lazy_sources import (  # noqa: F401 - the sources half, re-exported
    BATCH_KEYS,
    LAZY_KINDS,
    STATE_VERSION,
    WINDOW,
    ChainSource,
    FileSource,
    LazySource,
    ListSource,
    RecordSource,
    TfdsSource,
    _mix32,
    components,
    is_lazy,
    iter_documents,
    iter_source_documents,
    load_texts,
    open_source,
)
from lm_jax.data.packer import (  # noqa: F401 - re-exported
    Packer,
    _pad_row,
    _stack,
    make_row,
    quotas,
)
from lm_jax.data.prefetch import Prefetcher
from lm_jax.data.sources import (
    DataSourceError,
    parse_mixture,  # noqa: F401 - re-exported (it lives with parse_source)
)
from lm_jax.data.tokenizer import TokenizerError

# ----------------------------------------------------------------------------- document stream


def _epoch_seed(seed: int, epoch: int) -> int:
    return _mix32(seed, epoch, 0x5EED)


class DocStream:
    """Documents of a lazy source in training order (see the module docstring), or in storage
    order once (`repeat=False, shuffle=False`). `position` = [epoch, k, d] of the next document."""

    def __init__(
        self,
        source: LazySource,
        *,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ):
        import grain

        self.source, self.seed, self.shuffle, self.repeat = source, seed, shuffle, repeat
        self.p, self.P = process_index, process_count
        self.n = source.num_units()
        if self.n < self.P:
            raise ConfigError(
                f"data source {source.name!r} has {self.n} units (file blocks or records), fewer "
                f"than the {self.P} processes; use a smaller --data.block_bytes or more data"
            )
        self._grain = grain
        self.per_epoch = -(-(self.n - self.p) // self.P)  # units of this process per epoch
        self.position = [0, 0, 0]
        self._perm = (None, None)  # (epoch, shuffled index dataset)
        self._unit = (None, None)  # ((epoch, k), docs)

    def unit_id(self, epoch: int, k: int) -> int:
        i = k * self.P + self.p
        if not self.shuffle:
            return i
        if self._perm[0] != epoch:
            ds = self._grain.MapDataset.range(self.n).shuffle(seed=_epoch_seed(self.seed, epoch))
            self._perm = (epoch, ds)
        return int(self._perm[1][i])

    def _docs(self, epoch: int, k: int) -> list[tuple[int, str]]:
        if self._unit[0] != (epoch, k):
            u = self.unit_id(epoch, k)
            docs = self.source.read_unit(u)
            if self.shuffle and len(docs) > 1:
                order = np.random.default_rng([self.seed, epoch, u]).permutation(len(docs))
                docs = [docs[j] for j in order]
            self._unit = ((epoch, k), docs)
        return self._unit[1]

    def next(self):
        """(position, example_id, text) of the next document, or None at the end (no repeat)."""
        epoch, k, d = self.position
        empty_units = 0
        while True:
            if k >= self.per_epoch:
                if not self.repeat:
                    return None
                epoch, k, d = epoch + 1, 0, 0
            docs = self._docs(epoch, k)
            if d < len(docs):
                self.position = [epoch, k, d + 1]
                return [epoch, k, d], docs[d][0], docs[d][1]
            k, d = k + 1, 0
            empty_units += 1
            if empty_units > self.per_epoch + 1:
                raise DataSourceError(
                    f"data source {self.source.name!r}: this process's units hold no documents"
                )

    def seek(self, position) -> None:
        self.position = [int(x) for x in position]


# ----------------------------------------------------------------------------- iterators


class StreamIterator:
    """Training (endless, mixture) or evaluation (one pass) batches of a lazy source, with
    JSON-able state {"version", "next_batch", "sources": [packer states], fingerprint...}."""

    def __init__(
        self,
        packers,
        weights,
        *,
        local: int,
        glob_batch: int,
        process_index: int,
        process_count: int,
        seed: int,
        train: bool,
        fingerprint: dict,
        stats: dict,
        scan=None,
        prefetch: int = 2,
    ):
        self.packers, self.weights = packers, list(weights)
        self.local, self.B, self.p, self.P = local, glob_batch, process_index, process_count
        self.seed, self.train = seed, train
        self._fingerprint, self.stats = fingerprint, stats
        self._next, self._ended = 0, False
        self._scan, self._total = scan, None
        self.num_batches = None  # unknown for a stream (evaluation stops at the end of the split)
        self.prefetch = int(prefetch)  # batches a background thread prepares ahead (0: none)
        self._pf: Prefetcher | None = None  # over _Produced(self) while prefetching

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.prefetch <= 0:
            return self._produce()
        if self._pf is None:
            self._pf = Prefetcher(_Produced(self), depth=self.prefetch)
        return next(self._pf)[1]

    def _produce(self) -> dict[str, np.ndarray]:
        rows = self._train_batch() if self.train else self._eval_batch()
        self._next += 1
        return _stack(rows)

    def _join(self) -> None:
        """Stop prefetching; the packers are rewound to what was handed out."""
        if self._pf is not None:
            self._pf.close()
            self._pf = None

    def _train_batch(self):
        q = quotas(self.weights, self._next, self.local)
        which = np.repeat(np.arange(len(q)), q)
        if len(q) > 1:
            which = np.random.default_rng([self.seed, self.p, self._next, 7]).permutation(which)
        return [self.packers[c].row() for c in which]

    def _eval_batch(self):
        if self._ended:
            raise StopIteration
        pk, rows, T = self.packers[0], [], self.packers[0].T
        for j in range(self.B):
            r = pk.row()
            if r is None:
                if j == 0:
                    self._ended = True
                    raise StopIteration
                r = _pad_row(T, pk.pad)
                self._ended = True
            if j % self.P == self.p:
                rows.append(r)
        return rows

    @property
    def total_bytes(self) -> int:
        """UTF-8 bytes of the split's documents (evaluation iterators)."""
        if self._total is None:
            if self._ended and not self.train and self._pf is None:
                self._total = int(self.packers[0].bytes)
            elif self._scan is not None:
                self._total = int(sum(len(t.encode("utf-8")) for _, t in self._scan()))
            else:
                return 0
        return self._total

    def get_state(self) -> dict:
        if self._pf is not None:  # prefetching: the state after the last batch handed out
            return copy.deepcopy(self._pf.get_state())
        return self._raw_state()

    def _raw_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "next_batch": self._next,
            "ended": self._ended,
            "sources": [p.get_state() for p in self.packers],
            **self._fingerprint,
        }

    def set_state(self, state: dict) -> None:
        if (
            not isinstance(state, dict)
            or state.get("version") != STATE_VERSION
            or "sources" not in state
        ):
            raise ValueError(f"not a streaming data iterator state: {state!r}")
        diff = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
        if diff:
            raise ConfigError(
                "the saved data iterator state belongs to a different data set-up "
                f"(field: (saved, now) = {diff}); resume with the original data config"
            )
        if len(state["sources"]) != len(self.packers):
            raise ConfigError("the saved data state has a different number of mixture sources")
        self._join()
        self._restore(state)

    def _restore(self, state: dict) -> None:
        for p, s in zip(self.packers, state["sources"], strict=True):
            p.set_state(s)
        self._next, self._ended = int(state["next_batch"]), bool(state.get("ended", False))

    def close(self) -> None:
        self._join()

    def __del__(self):
        try:
            if self._pf is not None and self._pf._stop is not None:
                self._pf._stop.set()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Produced:
    """A StreamIterator's own batches and raw state, for the Prefetcher."""

    def __init__(self, it: StreamIterator):
        self._it = weakref.ref(it)  # the prefetch thread must not keep the iterator alive

    @property
    def it(self) -> StreamIterator:
        it = self._it()
        if it is None:
            raise StopIteration  # the iterator is gone: the prefetch thread ends
        return it

    def __next__(self):
        return self.it._produce()

    def get_state(self) -> dict:
        return self.it._raw_state()

    def set_state(self, state: dict) -> None:
        self.it._restore(state)


def make_stream_dataset(
    cfg,
    tokenizer,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    prefetch: int = 2,
) -> StreamIterator:
    """Batches of a lazy (or mixture) source: see the module docstring."""
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size {cfg.batch_size} must be divisible by the {process_count} processes"
        )
    V = tokenizer.vocab_size
    if not 0 <= int(tokenizer.pad_id) < V:
        raise TokenizerError(f"pad id {tokenizer.pad_id} is outside the vocabulary [0, {V})")
    comps = components(cfg.source)

    def opened(src):
        return open_source(src, split, val_fraction=cfg.val_fraction, block_bytes=cfg.block_bytes)

    T, pad = cfg.seq_len, tokenizer.pad_id
    fp = {
        "split": split,
        "source": cfg.source,
        "vocab_size": V,
        "seq_len": T,
        "batch_size": cfg.batch_size,
        "process_index": process_index,
        "process_count": process_count,
        "block_bytes": cfg.block_bytes,
        "val_fraction": cfg.val_fraction,
    }
    if repeat:
        fp.update(seed=cfg.seed, shuffle=cfg.shuffle)
        packers, names = [], []
        for c, (_, src) in enumerate(comps):
            ds = DocStream(
                opened(src),
                seed=_mix32(cfg.seed, c),
                shuffle=cfg.shuffle,
                repeat=True,
                process_index=process_index,
                process_count=process_count,
            )
            packers.append(Packer(ds, tokenizer, T, pad))
            names.append(ds.source)
        weights = [w for w, _ in comps]
        scan = None
    else:
        sources = [opened(src) for _, src in comps]
        chain = sources[0] if len(sources) == 1 else ChainSource(sources)
        ds = DocStream(chain, shuffle=False, repeat=False)  # every process reads the whole split
        packers, weights, names = [Packer(ds, tokenizer, T, pad)], [1.0], sources

        def scan():  # fresh sources: the prefetch thread may be reading the others
            for _, src in comps:
                yield from iter_source_documents(
                    src, split, val_fraction=cfg.val_fraction, block_bytes=cfg.block_bytes
                )

    stats = {
        "documents": None,  # unknown until streamed
        "tokens": None,
        "rows": None,
        "split_documents": None,
        "bytes": sum(getattr(s, "total", 0) for s in names) or None,
        "units": sum(s.num_units() for s in names),
        "streaming": True,
        "sources": [s.name for s in names],
        "weights": [w / sum(weights) for w in weights] if repeat else None,
    }
    return StreamIterator(
        packers,
        weights,
        local=cfg.batch_size // process_count,
        glob_batch=cfg.batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=cfg.seed,
        train=repeat,
        fingerprint=fp,
        stats=stats,
        scan=scan,
        prefetch=prefetch,
    )
