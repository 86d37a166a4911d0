"""Character-level tokenizer: the vocabulary is the sorted distinct characters of a corpus
(nanoGPT's shakespeare_char), ids 0..V-1, no special tokens."""

from __future__ import annotations

import json
import os

import numpy as np

from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register

FILE = "chars.json"


@register("char")
class CharTokenizer(Tokenizer):
    """Vocabulary = the sorted distinct characters of a corpus; an unknown character is an error."""

    def __init__(self, chars: str):
        if not chars:
            raise TokenizerError("a char tokenizer needs a non-empty corpus to take its vocabulary")
        self.chars = "".join(sorted(set(chars)))
        self._index = {c: i for i, c in enumerate(self.chars)}
        self._codepoints = np.array([ord(c) for c in self.chars], np.int64)  # sorted

    @classmethod
    def from_texts(cls, texts) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _unknown(self, text: str) -> TokenizerError:
        bad = sorted(set(text) - set(self.chars))
        return TokenizerError(
            f"characters {bad[:10]!r} are not in this char tokenizer's vocabulary "
            f"({self.vocab_size} characters from its corpus); build it from a corpus that contains "
            "them, or use the byte tokenizer (--data.tokenizer=byte) for open text"
        )

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            raise self._unknown(text) from None

    def encode_array(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, cps)
        ok = (ids < len(self._codepoints)) & (
            self._codepoints[np.minimum(ids, len(self._codepoints) - 1)] == cps
        )
        if not ok.all():
            raise self._unknown(text)
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < len(self.chars))

    def _save_files(self, directory: str) -> dict:
        with open(os.path.join(directory, FILE), "w") as f:
            json.dump(self.chars, f)
        return {}

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> CharTokenizer:
        path = os.path.join(directory, FILE)
        try:
            with open(path) as f:
                chars = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"char tokenizer file {path!r} is missing or corrupt: {e}") from e
        if not isinstance(chars, str):
            raise TokenizerError(f"char tokenizer file {path!r} is corrupt: expected a JSON string")
        return cls(chars)
