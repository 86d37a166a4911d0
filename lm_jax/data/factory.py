"""Tokenizer spec strings -> tokenizers: "byte", "char", "sentencepiece:<bpe|unigram>:<vocab>",
"dir:<path>" (a saved tokenizer folder)."""

from __future__ import annotations

from collections.abc import Iterable

from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.data.char_tokenizer import CharTokenizer
from lm_jax.data.sp_tokenizer import SentencePieceTokenizer
from lm_jax.data.streaming import is_lazy, iter_documents, load_texts
from lm_jax.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

SPEC_HELP = "byte, char, sentencepiece:<bpe|unigram>:<vocab size> or dir:<saved tokenizer folder>"


def parse_tokenizer_spec(spec: str, error=TokenizerError, prefix: str = "") -> tuple[str, tuple]:
    """Check `spec`; split it: ('byte', ()), ('sentencepiece', ('bpe', 8192)), ('dir', (path,))."""
    kind, _, rest = spec.partition(":")
    if kind in ("byte", "char") and not rest:
        return kind, ()
    if kind == "dir" and rest:
        return kind, (rest,)
    if kind == "sentencepiece":
        model_type, _, vocab = rest.partition(":")
        if model_type in ("bpe", "unigram") and vocab.isdigit() and int(vocab) >= 8:
            return kind, (model_type, int(vocab))
        raise error(
            f"{prefix}malformed tokenizer spec {spec!r}: use sentencepiece:<bpe|unigram>:<vocab>, "
            "e.g. sentencepiece:bpe:8192 (vocab >= 8)"
        )
    raise error(f"{prefix}unknown tokenizer spec {spec!r}: use {SPEC_HELP}")


def _texts(texts_iter):
    for t in texts_iter:
        yield t[1] if isinstance(t, tuple) else t


def build_tokenizer(spec: str, texts_iter: Iterable | None = None) -> Tokenizer:
    """Make the tokenizer `spec` names, training it on `texts_iter` (texts or (id, text) pairs)
    when it learns from data (char, sentencepiece); byte and dir: ignore `texts_iter`."""
    kind, args = parse_tokenizer_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "dir":
        return load_tokenizer(args[0])
    if texts_iter is None:
        raise TokenizerError(f"tokenizer {spec!r} is trained from text: pass texts_iter")
    if kind == "char":
        return CharTokenizer.from_texts(_texts(texts_iter))
    model_type, vocab = args
    return SentencePieceTokenizer.train(_texts(texts_iter), vocab, model_type)


def build_tokenizer_for(cfg) -> Tokenizer:
    """The tokenizer of a `DataConfig`: char takes its vocabulary from both splits (as nanoGPT
    does, so validation has no unknown characters); sentencepiece trains on the train split."""
    kind, _ = parse_tokenizer_spec(cfg.tokenizer)
    if kind in ("byte", "dir"):
        return build_tokenizer(cfg.tokenizer)
    splits = ("train", "validation") if kind == "char" else ("train",)
    if is_lazy(cfg.source):  # streamed (one unit at a time): reads the whole split once
        texts = (t for s in splits for _, t in iter_documents(cfg, s))
    else:
        texts = (
            t for s in splits for _, t in load_texts(cfg.source, s, val_fraction=cfg.val_fraction)
        )
    return build_tokenizer(cfg.tokenizer, texts)
