"""Lazy document sources for streaming: large text files read by byte ranges (blocks cut at a
separator, shuffled per epoch, sliced per process), array_record / tfds records through grain,
in-memory lists and chains of them; `open_source`, `iter_documents`, `load_texts`. The row
stream over them (documents -> packed rows, mixtures, resumable state) is `lm_jax.data.streaming`.
"""

from __future__ import annotations

import bisect
import os

import numpy as np

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
