"""One tokenizer interface over byte-level, SentencePiece and HF `tokenizers` BPE.

Every tokenizer saves itself into a directory (written beside each checkpoint) and is loaded
back with `load_tokenizer(dir)`, which dispatches on the `tokenizer.json`-independent
`lm_jax_tokenizer.json` manifest.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import json
import os

import numpy as np

from lm_jax.errors import TokenizerError  # defined there, re-exported here

MANIFEST = "lm_jax_tokenizer.json"


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses set `kind` and implement the abstract methods."""

    kind: str = "abstract"

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int = 0

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array (subclasses override with a vectorised version)."""
        return np.asarray(self.encode(text), np.int32)

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> Tokenizer:
        """Load from `directory` (written by `save`); `manifest` is its parsed manifest."""
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a directory")

    @abc.abstractmethod
    def _save_files(self, directory: str) -> dict:
        """Write the tokenizer's own files into `directory`; return extra manifest fields."""

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        extra = self._save_files(directory)
        manifest = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            **extra,
        }
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)

    def check_fits(self, model_vocab_size: int) -> None:
        """Raise if a token id this tokenizer can emit has no row in the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(
                f"tokenizer vocab ({self.vocab_size}) is larger than the model's vocab_size "
                f"({model_vocab_size}): token ids would fall outside the embedding. Set the "
                f"model's vocab_size >= {self.vocab_size} or use a smaller tokenizer."
            )


_REGISTRY: dict[str, type] = {}
# Modules that register tokenizer kinds; optional ones are imported only if they exist.
_KIND_MODULES = (
    "lm_jax.data.byte_tokenizer",
    "lm_jax.data.char_tokenizer",
    "lm_jax.data.sp_tokenizer",
    "lm_jax.data.hf_tokenizer",
    "lm_jax.data.scenes",  # WordTokenizer of the image-text captions
)


def _import_kinds() -> None:
    for name in _KIND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def register(kind: str):
    def deco(cls):
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def load_tokenizer(directory: str) -> Tokenizer:
    """Load any saved lm_jax tokenizer from `directory`."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise TokenizerError(
            f"no tokenizer in {directory!r} (missing {MANIFEST}); save one with "
            "`tokenizer.save(dir)` or point to the checkpoint's tokenizer folder."
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        kind = manifest["kind"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise TokenizerError(f"corrupt tokenizer manifest {path!r}: {e!r}") from e
    if kind not in _REGISTRY:
        _import_kinds()
    if kind not in _REGISTRY:
        raise TokenizerError(
            f"tokenizer manifest {path!r} names unknown kind {kind!r} (known: "
            f"{sorted(_REGISTRY)}); is the module that registers it installed?"
        )
    tok = _REGISTRY[kind].from_dir(directory, manifest)
    for name in ("pad_id", "bos_id", "eos_id"):
        v = manifest.get(name)
        if v is not None and not (isinstance(v, int) and 0 <= v < tok.vocab_size):
            raise TokenizerError(
                f"corrupt tokenizer in {directory!r}: {name} {v!r} is outside the vocabulary "
                f"[0, {tok.vocab_size}) (token id >= vocab or negative); rebuild the tokenizer"
            )
    if manifest.get("vocab_size") not in (None, tok.vocab_size):
        raise TokenizerError(
            f"corrupt tokenizer in {directory!r}: manifest says vocab_size "
            f"{manifest['vocab_size']} but the files give {tok.vocab_size}"
        )
    return tok
