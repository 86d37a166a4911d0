"""SentencePiece tokenizer (BPE or unigram), trained offline on our corpora.

Ids: pad 0, unk 1, bos 2, eos 3, "\n" 4, then the pieces. Trained with `byte_fallback`, no
normalisation, spaces kept and no dummy prefix, so `decode(encode(text)) == text` for any text
(unseen characters become byte pieces, newlines stay newlines).
"""

from __future__ import annotations

import io
import os

import numpy as np

from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register

MODEL_FILE = "sentencepiece.model"
MODEL_TYPES = ("bpe", "unigram")


def _lines(texts):
    for t in texts:
        if isinstance(t, tuple):  # (example_id, text) from `load_texts`
            t = t[1]
        for line in t.splitlines():
            if line.strip():
                yield line


@register("sentencepiece")
class SentencePieceTokenizer(Tokenizer):
    """Wraps a serialized sentencepiece model: pad 0, unk 1, bos 2, eos 3."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.LoadFromSerializedProto(self.proto)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise TokenizerError(f"corrupt sentencepiece model: {e}") from e
        if ok is False or self.sp.GetPieceSize() == 0:
            raise TokenizerError("corrupt sentencepiece model: it loads with no pieces")
        self.pad_id, self.bos_id, self.eos_id = 0, 2, 3

    @classmethod
    def train(
        cls,
        texts=None,
        vocab_size: int = 8000,
        model_type: str = "bpe",
        *,
        input_file: str | None = None,
        max_sentences: int = 2_000_000,
        num_threads: int = 2,
    ) -> SentencePieceTokenizer:
        """Train on an iterable of texts (or (id, text) pairs), one sentence per line, or on
        `input_file` (a plain-text file, one sentence per line)."""
        import sentencepiece as spm

        if model_type not in MODEL_TYPES:
            raise TokenizerError(
                f"sentencepiece model_type must be one of {MODEL_TYPES}, got {model_type!r}"
            )
        if (texts is None) == (input_file is None):
            raise TokenizerError("SentencePieceTokenizer.train needs one of texts or input_file")
        if vocab_size < 8:
            raise TokenizerError(f"sentencepiece vocab_size must be >= 8, got {vocab_size}")
        source = {"input": input_file} if input_file else {"sentence_iterator": _lines(texts)}
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                **source,
                model_writer=out,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                byte_fallback=True,
                # Keep text exactly: no NFKC, spaces kept, newlines as their own piece.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                user_defined_symbols=["\n"],
                character_coverage=1.0,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=num_threads,
                minloglevel=2,
                max_sentence_length=1 << 16,
            )
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"training a {model_type} sentencepiece tokenizer of {vocab_size} pieces failed: "
                f"{e} (vocab_size must hold 256 byte pieces + the corpus's distinct characters + "
                "5 specials, and not exceed what the corpus supports: 'too high' needs a smaller "
                "vocab_size or a larger corpus)"
            ) from e
        return cls(out.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def encode_array(self, text: str) -> np.ndarray:
        # Encode line by line (in sentencepiece's threads); newlines become their own pieces.
        lines = text.split("\n")
        pieces = self.sp.Encode(lines, num_threads=2)
        nl = self.sp.EncodeAsIds("\n")
        out = []
        for i, p in enumerate(pieces):
            if i:
                out.extend(nl)
            out.extend(p)
        return np.asarray(out, np.int32)

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def _save_files(self, directory: str) -> dict:
        with open(os.path.join(directory, MODEL_FILE), "wb") as f:
            f.write(self.proto)
        return {}

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> SentencePieceTokenizer:
        path = os.path.join(directory, MODEL_FILE)
        if not os.path.isfile(path):
            raise TokenizerError(f"sentencepiece model file {path!r} is missing")
        with open(path, "rb") as f:
            data = f.read()
        try:
            return cls(data)
        except TokenizerError as e:
            raise TokenizerError(f"sentencepiece model file {path!r}: {e}") from e
