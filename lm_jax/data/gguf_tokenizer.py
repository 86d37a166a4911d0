"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face `tokenizers` pipeline.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`),
per-token types and scores, merges when the model has them, the special ids and flags. Two
tokenizer types cover the decoders lm_jax loads:

  'gpt2'   byte-level BPE (SmolLM2, Llama 3, Qwen2): BPE over the vocabulary and the file's
           merges, byte-level pre-tokenizer (the llama-3 split regex for the
           `tokenizer.ggml.pre` names that use it, else GPT-2's), byte-level decoder.
  'llama'  SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma): the file has no
           merges, so they are derived: every way of cutting a NORMAL piece into two pieces of
           the vocabulary is a merge, ranked by the merged piece's score (SentencePiece's BPE
           merges, at each step, the adjacent pair whose merged piece scores highest; ties go
           to the earlier id). Spaces become '▁' (prefixed once when
           `tokenizer.ggml.add_space_prefix`), characters outside the vocabulary fall back to
           their UTF-8 byte pieces `<0xNN>`.

In both, CONTROL tokens (type 3, and UNKNOWN, type 2) become special added tokens and
USER_DEFINED ones (type 4: Gemma's '\\n\\n', runs of spaces, HTML tags) plain added tokens, all
matched whole in the raw text (llama.cpp writes a SentencePiece user-defined piece's '▁' as the
space the text has). With the space prefix, each stretch of text between added tokens gets one
(the normalizer runs per stretch); sentencepiece prefixes only the start, so the two differ next
to a user-defined piece (Llama-2-style vocabularies have none; Gemma's has no prefix). BOS/EOS
are added by a post-processor when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so (a
'llama' file that does not say adds BOS, as transformers' GGUF loader assumes).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lm_jax.errors import TokenizerError

SUPPORTED_TYPES = ("gpt2", "llama")
SPACE = "\u2581"  # SentencePiece's '▁'
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex (others: GPT-2's regex inside the ByteLevel pre-tokenizer).
GGUF_PRE_SPLITS = {
    name: _LLAMA3_SPLIT
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
}


class GGUFTokenizerParts(NamedTuple):
    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def sentencepiece_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first.

    Every split of a NORMAL piece p = a + b with a and b in the vocabulary, ranked by p's score
    (descending), then p's id, then the split point (shorter left part first).
    """
    known = set(tokens)
    normal = np.flatnonzero(np.asarray(types) == _NORMAL)
    # best first: score descending, then id (a stable sort keeps id order among equal scores)
    order = normal[np.argsort(-np.asarray(scores, np.float64)[normal], kind="stable")]
    merges = []
    for i in order.tolist():
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left = piece[:cut]
            if left in known:
                right = piece[cut:]
                if right in known:
                    merges.append((left, right))
    return merges


def _byte_level_bpe(meta: dict, tokens: list[str], types: list[int]):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TkTokenizer

    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges.")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(t: str) -> str:
        return t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    tk = TkTokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    # Matched in the raw text. A control token outside the byte alphabet is a llama.cpp mislabel
    # with no vocab entry.
    control = [
        t for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN) and set(t) <= alphabet
    ]
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    return (
        tk,
        [AddedToken(t, normalized=False, special=True) for t in control],
        [AddedToken(t, normalized=False, special=False) for t in user],
    )


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]):
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as TkTokenizer

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens) or len(types) != len(tokens):
        raise TokenizerError(
            "GGUF SentencePiece tokenizer needs tokenizer.ggml.scores and token_type with one "
            f"entry per token ({len(tokens)}); the file's are missing or of another length."
        )
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = TkTokenizer(
        models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(tokens, scores, types),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # The normalizer runs on each stretch of text between added tokens; no pre-tokenizer, as
    # SentencePiece does not cut the text at spaces before merging.
    escape = normalizers.Replace(" ", SPACE)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), escape]) if prefix else escape
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # the prefixed space is not part of the text
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    control = [t for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)]
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    return (
        tk,
        [AddedToken(t, normalized=False, special=True) for t in control],
        [AddedToken(t, normalized=False, special=False) for t in user],
    )


def build_from_gguf_metadata(meta: dict) -> GGUFTokenizerParts:
    """Rebuild the tokenizer a GGUF describes from its `tokenizer.*` metadata values."""
    from tokenizers import processors

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TYPES:
        raise TokenizerError(
            f"GGUF tokenizer type {kind!r} is not supported: lm_jax rebuilds {SUPPORTED_TYPES} "
            "('gpt2' byte-level BPE, 'llama' SentencePiece BPE); load the weights with "
            "from_gguf(path, tokenizer=False) and the tokenizer from a tokenizer.json folder "
            "(HFTokenizer.from_pretrained_dir)."
        )
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError("GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer.")
    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    types = [int(t) for t in (meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))]
    build = _byte_level_bpe if kind == "gpt2" else _sentencepiece_bpe
    tk, control, user = build(meta, tokens, types)
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)

    def tid(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    bos, eos, pad = tid("bos_token_id"), tid("eos_token_id"), tid("padding_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        b = [(tk.id_to_token(bos), bos)] if add_bos else []
        e = [(tk.id_to_token(eos), eos)] if add_eos else []
        pre = "".join(f"{t} " for t, _ in b)
        post = "".join(f" {t}" for t, _ in e)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{pre}$A{post}", pair=f"{pre}$A{post} {pre}$B{post}", special_tokens=b + e
        )
    return GGUFTokenizerParts(tk, bos, eos, pad, meta.get("tokenizer.chat_template"))
