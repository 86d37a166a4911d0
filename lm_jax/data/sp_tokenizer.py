"""SentencePiece tokenizer (BPE or unigram), trained offline on our corpora."""

from __future__ import annotations

import io
import os

from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register

MODEL_FILE = "sentencepiece.model"


@register("sentencepiece")
class SentencePieceTokenizer(Tokenizer):
    """Wraps a sentencepiece model: pad 0, unk 1, bos 2, eos 3."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise TokenizerError(f"corrupt sentencepiece model: {e}") from e
        self.pad_id, self.bos_id, self.eos_id = 0, 2, 3

    @classmethod
    def train(cls, texts, vocab_size: int, model_type: str = "bpe") -> SentencePieceTokenizer:
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise TokenizerError(f"sentencepiece model_type must be bpe or unigram: {model_type}")
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(line for t in texts for line in t.splitlines() if line),
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            byte_fallback=True,
            character_coverage=1.0,
            num_threads=2,
            minloglevel=2,
            max_sentence_length=1 << 16,
            train_extremely_large_corpus=False,
        )
        return cls(out.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

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
            return cls(f.read())
