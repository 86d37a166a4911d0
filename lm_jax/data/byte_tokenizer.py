"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes; specials (eos, bos) follow from 256."""

from __future__ import annotations

import numpy as np

from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register

SPECIALS = ("eos", "bos")  # the order in which specials take ids 256, 257, ...


@register("byte")
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes plus optional specials; the default has one special, eos = 256 (vocab 257).

    `pad_id` is 0 (the NUL byte): padded positions are always masked out of the loss.
    """

    def __init__(self, specials=("eos",)):
        specials = tuple(specials)
        bad = [s for s in specials if s not in SPECIALS] or len(set(specials)) != len(specials)
        if bad:
            raise TokenizerError(
                f"byte tokenizer specials must be distinct names from {SPECIALS}: {specials}"
            )
        self.specials = specials
        ids = {name: 256 + i for i, name in enumerate(specials)}
        self.eos_id, self.bos_id = ids.get("eos"), ids.get("bos")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def _save_files(self, directory: str) -> dict:
        return {"specials": list(self.specials)}

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> ByteTokenizer:
        return cls(manifest.get("specials", ["eos"]))
