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

import bisect
import copy
import os

import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.data.sources import (
    DEFAULT_VAL_FRACTION,
    SPLITS,
    DataSourceError,
    _text_of,
    _tfds_source,
    load_memory_texts,
    paragraphs,
    parse_mixture,  # noqa: F401 - re-exported (it lives with parse_source)
    parse_source,
)
from lm_jax.data.tokenizer import TokenizerError

STATE_VERSION = 1
WINDOW = 64 * 1024  # bytes searched for a separator at each block boundary
LAZY_KINDS = ("stream", "stream_lines", "array_record", "tfds", "tfds_dir", "mix")
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "example_ids")


def is_lazy(source: str) -> bool:
    return source.partition(":")[0] in LAZY_KINDS


def components(source: str) -> list[tuple[float, str]]:
    """A source string as weighted components (a plain source is one component of weight 1)."""
    kind, arg = parse_source(source)
    return parse_mixture(arg) if kind == "mix" else [(1.0, source)]


def _mix32(*xs: int) -> int:
    """A 31-bit hash of integers (stable across runs; for seeds and example ids)."""
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1)[0]) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- lazy sources


class LazySource:
    """A split of a source as `num_units` units, each read on demand into documents."""

    name = ""

    def num_units(self) -> int:
        raise NotImplementedError

    def read_unit(self, u: int) -> list[tuple[int, str]]:
        """Documents (example_id, text) of unit u, in storage order."""
        raise NotImplementedError


def _find_boundary(f, pos: int, end: int, sep: bytes, window: int = WINDOW) -> int:
    """The first document start at or after `pos` (not past `end`): after the first separator
    in the window, else after the first newline, else the next UTF-8 character start."""
    if pos <= 0 or pos >= end:
        return max(0, min(pos, end))
    f.seek(pos - len(sep))  # a separator straddling pos counts
    win = f.read(min(window, end - pos) + len(sep))
    i = win.find(sep)
    if i >= 0:
        return min(pos - len(sep) + i + len(sep), end)
    i = win.find(b"\n")
    if i >= 0:
        return min(pos - len(sep) + i + 1, end)
    j = len(sep)
    while j < len(win) and (win[j] & 0xC0) == 0x80:  # skip UTF-8 continuation bytes
        j += 1
    return min(pos - len(sep) + j, end)


class FileSource(LazySource):
    """`stream:` / `stream_lines:` files of a split, read by byte ranges."""

    def __init__(self, kind: str, pattern: str, split: str, val_fraction: float, block_bytes: int):
        import glob

        self.name = f"{kind}:{pattern}"
        self.lines = kind == "stream_lines"
        self.sep = b"\n" if self.lines else b"\n\n"
        self.block_bytes = int(block_bytes)
        path = os.path.expanduser(pattern)
        files = [f for f in sorted(glob.glob(path)) if os.path.isfile(f)]
        if not files:
            raise DataSourceError(
                f"data source {kind}:{pattern}: no such file(s) {path!r}; "
                "give an existing file or glob"
            )
        self.files, self.ranges, counts = files, [], []
        for fn in files:
            size = os.path.getsize(fn)
            with open(fn, "rb") as f:
                cut = _find_boundary(f, int(size * (1.0 - val_fraction)), size, self.sep)
            # window <= block size: boundaries are monotone, blocks never overlap
            lo, hi = (0, cut) if split == "train" else (cut, size)
            self.ranges.append((lo, hi))
            counts.append(-(-(hi - lo) // self.block_bytes) if hi > lo else 0)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(sum(hi - lo for lo, hi in self.ranges))  # bytes (separators included)
        if self.offsets[-1] == 0:
            raise DataSourceError(
                f"data source {self.name!r} has no text for split {split!r} (files: {files}); "
                "check the files are not empty"
            )
        self._fh: dict[int, object] = {}

    def num_units(self) -> int:
        return int(self.offsets[-1])

    def _file(self, i: int):
        if i not in self._fh:
            if len(self._fh) >= 8:
                self._fh.pop(next(iter(self._fh))).close()
            self._fh[i] = open(self.files[i], "rb")  # noqa: SIM115 - kept open, closed on evict
        return self._fh[i]

    def block(self, u: int) -> tuple[int, int, int]:
        """(file index, start byte, end byte) of unit u."""
        i = int(np.searchsorted(self.offsets, u, side="right")) - 1
        lo, hi = self.ranges[i]
        b = u - int(self.offsets[i])
        f = self._file(i)
        w = min(WINDOW, self.block_bytes)
        start = lo if b == 0 else _find_boundary(f, lo + b * self.block_bytes, hi, self.sep, w)
        end = _find_boundary(f, lo + (b + 1) * self.block_bytes, hi, self.sep, w)
        return i, start, end

    def read_unit(self, u: int) -> list[tuple[int, str]]:
        i, start, end = self.block(u)
        if end <= start:
            return []
        f = self._file(i)
        f.seek(start)
        raw = f.read(end - start)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataSourceError(
                f"{self.files[i]!r} is not UTF-8 text near byte {start + e.start}: {e.reason}"
            ) from None
        if self.lines:
            docs = [ln for ln in text.split("\n") if ln.strip()]
        else:
            docs = paragraphs(text)
        return [(_mix32(u, d), t) for d, t in enumerate(docs)]

    def __getstate__(self):
        return {**self.__dict__, "_fh": {}}


class RecordSource(LazySource):
    """`array_record:<glob>`: each record is one UTF-8 document; the last `val_fraction` of the
    records (in file then record order) is the validation split."""

    def __init__(self, pattern: str, split: str, val_fraction: float):
        import glob

        import grain

        self.name = f"array_record:{pattern}"
        files = sorted(glob.glob(os.path.expanduser(pattern)))
        if not files:
            raise DataSourceError(f"data source {self.name}: no such file(s) {pattern!r}")
        try:
            self.src = grain.sources.ArrayRecordDataSource(files)
        except Exception as e:  # noqa: BLE001 - array_record raises RuntimeError etc.
            raise DataSourceError(f"{self.name}: cannot open as array_record ({e})") from None
        n = len(self.src)
        cut = int(n * (1.0 - val_fraction))
        self.lo, self.hi = (0, cut) if split == "train" else (cut, n)
        if self.hi <= self.lo:
            raise DataSourceError(f"{self.name} has no records for split {split!r} ({n} in all)")

    def num_units(self) -> int:
        return self.hi - self.lo

    def read_unit(self, u: int) -> list[tuple[int, str]]:
        rec = self.src[self.lo + u]
        return [(self.lo + u, rec.decode("utf-8") if isinstance(rec, bytes) else str(rec))]


class TfdsSource(LazySource):
    """`tfds:` / `tfds_dir:` read record by record from the tfds (array_record) data source."""

    def __init__(self, kind: str, arg: str, split: str):
        self.name = f"{kind}:{arg}"
        self.src, self.key, self.where = _tfds_source(kind, arg, split)
        if len(self.src) == 0:
            raise DataSourceError(f"{self.where} split {split!r} is empty")

    def num_units(self) -> int:
        return len(self.src)

    def read_unit(self, u: int) -> list[tuple[int, str]]:
        ex = self.src[u]
        return [(int(ex["id"]) if "id" in ex else u, _text_of(ex, self.key, self.where))]


class ListSource(LazySource):
    """An in-memory source (shakespeare, file:, ...) as units of one document each."""

    def __init__(self, source: str, split: str, val_fraction: float | None):
        self.name = source
        self.docs = load_memory_texts(source, split, val_fraction=val_fraction)

    def num_units(self) -> int:
        return len(self.docs)

    def read_unit(self, u: int) -> list[tuple[int, str]]:
        return [self.docs[u]]


class ChainSource(LazySource):
    """Sources one after the other (a mixture's validation splits)."""

    def __init__(self, sources: list[LazySource]):
        self.sources = sources
        self.name = ",".join(s.name for s in sources)
        self.offsets = [0]
        for s in sources:
            self.offsets.append(self.offsets[-1] + s.num_units())

    def num_units(self) -> int:
        return self.offsets[-1]

    def read_unit(self, u: int) -> list[tuple[int, str]]:
        c = bisect.bisect_right(self.offsets, u) - 1
        docs = self.sources[c].read_unit(u - self.offsets[c])
        return [(_mix32(c, i), t) for i, t in docs] if c else docs


def open_source(
    source: str, split: str, *, val_fraction: float | None = None, block_bytes: int = 1 << 20
) -> LazySource:
    """The lazy source of one (non-mixture) source string and split."""
    if split not in SPLITS:
        raise DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    kind, arg = parse_source(source)
    frac = DEFAULT_VAL_FRACTION.get(kind, 0.05) if val_fraction is None else val_fraction
    if kind in ("stream", "stream_lines"):
        return FileSource(kind, arg, split, frac, block_bytes)
    if kind == "array_record":
        return RecordSource(arg, split, frac)
    if kind in ("tfds", "tfds_dir"):
        return TfdsSource(kind, arg, split)
    if kind == "mix":
        raise DataSourceError("open_source takes one source; mixtures: use components()")
    return ListSource(source, split, val_fraction)


def iter_documents(cfg, split: str):
    """Every document (example_id, text) of `split` of `cfg.source`, unit by unit, in storage
    order (mixtures: each source in turn); holds one unit at a time."""
    for _, src in components(cfg.source):
        yield from iter_source_documents(
            src, split, val_fraction=cfg.val_fraction, block_bytes=cfg.block_bytes
        )


def iter_source_documents(
    source: str, split: str, *, val_fraction: float | None = None, block_bytes: int = 1 << 20
):
    """Every document (example_id, text) of one (non-mixture) source's split, unit by unit."""
    s = open_source(source, split, val_fraction=val_fraction, block_bytes=block_bytes)
    for u in range(s.num_units()):
        yield from s.read_unit(u)


def load_texts(
    source: str, split: str, *, val_fraction: float | None = None
) -> list[tuple[int, str]]:
    """Documents of `split` ('train' or 'validation') as a list of (example_id, text); streamed
    sources (stream:, stream_lines:, array_record:) are read whole (small sets only).

    `val_fraction` overrides the source's validation share (file-based sources only).
    """
    if source.partition(":")[0] in ("stream", "stream_lines", "array_record"):
        if split not in SPLITS:
            raise DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
        return list(iter_source_documents(source, split, val_fraction=val_fraction))
    return load_memory_texts(source, split, val_fraction=val_fraction)


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


# ----------------------------------------------------------------------------- packer


class Packer:
    """Rows of T + 1 tokens over a DocStream (concat-then-split), resumable exactly."""

    def __init__(self, docs: DocStream, tokenizer, seq_len: int, pad_id: int):
        self.docs, self.tok, self.T, self.pad = docs, tokenizer, seq_len, int(pad_id)
        self.eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], np.int32)
        self.buf: list[list] = []  # [position, example id, tokens, seq] from the row start
        self.offset = 0  # tokens of buf[0] before the next row's start
        self.seq = 0  # running document number (piece boundaries)
        self.done = False
        self.bytes = 0  # UTF-8 bytes of the documents pulled

    def _pull(self) -> bool:
        while True:
            nxt = self.docs.next()
            if nxt is None:
                self.done = True
                return False
            pos, ex, text = nxt
            toks = np.asarray(self.tok.encode_array(text), np.int32)
            if self.eos is not None:
                toks = np.concatenate([toks, self.eos])
            self.bytes += len(text.encode("utf-8"))
            if toks.size:
                self.seq += 1
                self.buf.append([pos, ex, toks, self.seq])
                return True

    def _have(self) -> int:
        return sum(b[2].size for b in self.buf) - self.offset

    def row(self) -> dict | None:
        """The next row (batch dict entries without the batch axis), None when the stream ended."""
        T = self.T
        while self._have() < T + 1 and not self.done:
            self._pull()
        n = min(self._have(), T + 1)
        if n <= 0:
            return None
        toks, own, seq = [], [], []
        need, off = n, self.offset
        for _, ex, t, s in self.buf:
            piece = t[off : off + need]
            off = 0
            toks.append(piece)
            own.append(np.full(piece.size, ex, np.int32))
            seq.append(np.full(piece.size, s, np.int64))
            need -= piece.size
            if need == 0:
                break
        tok, own, seq = np.concatenate(toks), np.concatenate(own), np.concatenate(seq)
        row = make_row(tok, own, seq, T, self.pad)
        self._advance(min(T, n))
        if n <= T:  # the stream ended inside this row: nothing left to start another
            self.buf, self.offset = [], 0
        return row

    def _advance(self, m: int) -> None:
        self.offset += m
        while self.buf and self.offset >= self.buf[0][2].size:
            self.offset -= self.buf[0][2].size
            self.buf.pop(0)

    def get_state(self) -> dict:
        if self.buf:
            return {"doc": list(self.buf[0][0]), "offset": int(self.offset), "done": False}
        return {"doc": list(self.docs.position), "offset": 0, "done": self.done}

    def set_state(self, state: dict) -> None:
        self.buf, self.offset, self.seq, self.done = [], 0, 0, bool(state.get("done", False))
        self.docs.seek(state["doc"])
        if not self.done and int(state["offset"]):
            self._pull()
            self.offset = int(state["offset"])


def make_row(tok, own, seq, T: int, pad_id: int) -> dict[str, np.ndarray]:
    """Batch-dict row from up to T + 1 stream tokens (owner ids and document numbers)."""
    n = tok.size
    j = np.arange(T)
    valid = j < min(n, T)
    nxt = j + 1 < n
    tokp = np.full(T + 1, pad_id, np.int32)
    tokp[:n] = tok
    seqp = np.full(T + 1, -1, np.int64)
    seqp[:n] = seq
    ownp = np.full(T + 1, -1, np.int32)
    ownp[:n] = own
    in_seq = seqp[:-1]
    start = np.ones(T, bool)
    start[1:] = in_seq[1:] != in_seq[:-1]
    first = np.maximum.accumulate(np.where(start, j, 0))
    return {
        "inputs": np.where(valid, tokp[:-1], pad_id).astype(np.int32),
        "targets": np.where(valid & nxt, tokp[1:], pad_id).astype(np.int32),
        "positions": np.where(valid, j - first, 0).astype(np.int32),
        "segment_ids": np.where(valid, np.cumsum(start), 0).astype(np.int32),
        "loss_mask": (valid & nxt & (seqp[1:] == in_seq)).astype(np.float32),
        "example_ids": np.where(valid, ownp[:-1], -1).astype(np.int32),
    }


def _pad_row(T: int, pad_id: int) -> dict[str, np.ndarray]:
    e = np.zeros(0, np.int32)
    return make_row(e, e, e.astype(np.int64), T, pad_id)


def _stack(rows) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def quotas(weights, k: int, rows: int) -> np.ndarray:
    """Rows of each source in batch k: differences of floor(cumulative share * rows so far)."""
    cw = np.cumsum(np.asarray(weights, np.float64))
    cw = cw / cw[-1]

    def upto(b):
        c = np.floor(cw * b * rows + 1e-9).astype(np.int64)
        c[-1] = b * rows
        return np.diff(np.r_[0, c])

    return upto(k + 1) - upto(k)


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
        self._thread = self._queue = self._stop = None
        self._state = None  # state after the last batch handed out (while prefetching)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.prefetch <= 0:
            return self._produce()
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._join()
            raise item
        batch, self._state = item
        return batch

    def _produce(self) -> dict[str, np.ndarray]:
        rows = self._train_batch() if self.train else self._eval_batch()
        self._next += 1
        return _stack(rows)

    def _start(self) -> None:
        import queue
        import threading

        self._state = self._raw_state()
        self._queue, self._stop = queue.Queue(self.prefetch), threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(self._queue, self._stop), daemon=True, name="lm_jax-stream"
        )
        self._thread.start()

    def _work(self, q, stop) -> None:
        import queue

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            while put((self._produce(), self._raw_state())):
                pass
        except BaseException as e:  # noqa: BLE001 - StopIteration and errors go to the consumer
            put(e)

    def _join(self) -> None:
        """Stop the prefetch thread (it produced ahead; `_state` is what was handed out)."""
        import queue

        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = self._queue = self._stop = None

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
            if self._ended and not self.train and self._thread is None:
                self._total = int(self.packers[0].bytes)
            elif self._scan is not None:
                self._total = int(sum(len(t.encode("utf-8")) for _, t in self._scan()))
            else:
                return 0
        return self._total

    def get_state(self) -> dict:
        if self._state is not None:  # prefetching: the state after the last batch handed out
            return copy.deepcopy(self._state)
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
        self._state = None
        for p, s in zip(self.packers, state["sources"], strict=True):
            p.set_state(s)
        self._next, self._ended = int(state["next_batch"]), bool(state.get("ended", False))

    def close(self) -> None:
        self._join()

    def __del__(self):
        try:
            if self._stop is not None:
                self._stop.set()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


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
