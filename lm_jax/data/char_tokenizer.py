"""Character- and byte-level tokenizers (nanoGPT's shakespeare_char vocabulary; raw UTF-8)."""

from __future__ import annotations

import json
import os

from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register


@register("char")
class CharTokenizer(Tokenizer):
    """Vocabulary = the sorted distinct characters of a corpus (ids 0..V-1), no specials."""

    def __init__(self, chars: str):
        if not chars:
            raise TokenizerError("a char tokenizer needs a non-empty corpus to take its vocabulary")
        self.chars = "".join(sorted(set(chars)))
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, texts) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise TokenizerError(
                f"character {e.args[0]!r} is not in this char tokenizer's vocabulary "
                f"({self.vocab_size} characters); use a byte tokenizer for open text"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < len(self.chars))

    def _save_files(self, directory: str) -> dict:
        with open(os.path.join(directory, "chars.json"), "w") as f:
            json.dump(self.chars, f)
        return {}

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> CharTokenizer:
        path = os.path.join(directory, "chars.json")
        try:
            with open(path) as f:
                return cls(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"char tokenizer file {path!r} is missing or corrupt: {e}") from e


@register("byte")
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, plus an end-of-document id 256."""

    eos_id = 256

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def _save_files(self, directory: str) -> dict:
        return {}

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> ByteTokenizer:
        return cls()
