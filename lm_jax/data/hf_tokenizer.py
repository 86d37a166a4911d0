"""Hugging Face `tokenizers` tokenizers: from a `tokenizer.json` folder or a GGUF's metadata.

`HFTokenizer` wraps a `tokenizers.Tokenizer` (whatever `tokenizer.json` describes: BPE,
unigram, WordPiece) plus the special token ids and the chat template (a jinja2 template rendered
as transformers does: `lm_jax.data.chat_template.render_chat`).

From a GGUF (`HFTokenizer.from_gguf_metadata`), llama.cpp's `tokenizer.ggml.model = "gpt2"`
byte-level BPE is rebuilt as transformers' GGUF loader does: BPE over the vocabulary and merges,
byte-level pre-tokenizer (the llama-3 split regex for the `tokenizer.ggml.pre` names that use
it, else GPT-2's), byte-level decoder; CONTROL tokens (type 3) become special added tokens and
USER_DEFINED ones (type 4) plain added tokens, so they are matched whole; BOS/EOS are added by
a post-processor when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so.
"""

from __future__ import annotations

import json
import os

from lm_jax.data.chat_template import render_chat
from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex (others: GPT-2's regex inside the ByteLevel pre-tokenizer).
GGUF_PRE_SPLITS = {
    name: _LLAMA3_SPLIT
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
}


def _bytes_to_unicode() -> dict[int, str]:
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


def _token_content(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


@register("hf_tokenizers")
class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with special ids and an optional chat template."""

    def __init__(
        self,
        tokenizer,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
    ):
        self.tk = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.chat_template = chat_template

    # ------------------------------------------------------------------ Tokenizer API

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` runs the post-processor (e.g. adds BOS)."""
        return list(self.tk.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def _special(self, i: int | None) -> str | None:
        return None if i is None else self.tk.id_to_token(i)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render `messages` ([{role, content}]) with the chat template (transformers' rules).

        Encode the result with `encode(text, add_special_tokens=False)`: templates write their
        own BOS where the model wants one.
        """
        if not self.chat_template:
            raise TokenizerError(
                "this tokenizer has no chat template: pass one as HFTokenizer(..., "
                "chat_template=...) or load a tokenizer that carries one."
            )
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special(self.bos_id) or "",
            eos_token=self._special(self.eos_id) or "",
            pad_token=self._special(self.pad_id) or "",
            **kwargs,
        )

    # ------------------------------------------------------------------ save / load

    def _save_files(self, directory: str) -> dict:
        self.tk.save(os.path.join(directory, TOKENIZER_FILE))
        if self.chat_template:
            with open(os.path.join(directory, CHAT_TEMPLATE_FILE), "w") as f:
                f.write(self.chat_template)
        return {"chat_template_file": CHAT_TEMPLATE_FILE if self.chat_template else None}

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> HFTokenizer:
        tk = _load_tokenizer_json(directory)
        template = None
        if manifest.get("chat_template_file"):
            path = os.path.join(directory, manifest["chat_template_file"])
            if not os.path.isfile(path):
                raise TokenizerError(f"chat template file {path!r} is missing")
            with open(path) as f:
                template = f.read()
        return cls(tk, manifest.get("bos_id"), manifest.get("eos_id"), manifest.get("pad_id"),
                   template)  # fmt: skip

    @classmethod
    def from_pretrained_dir(cls, directory: str) -> HFTokenizer:
        """A transformers tokenizer folder: tokenizer.json (+ tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja when present)."""
        tk = _load_tokenizer_json(directory)
        conf: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        conf.update(json.load(f))
                except json.JSONDecodeError as e:
                    raise TokenizerError(f"corrupt {path!r}: {e}") from e

        def special(key):
            content = _token_content(conf.get(key))
            return None if content is None else tk.token_to_id(content)

        template = conf.get("chat_template")
        if isinstance(template, list):  # [{name, template}]: take "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                template = f.read()
        return cls(tk, special("bos_token"), special("eos_token"), special("pad_token"), template)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> HFTokenizer:
        """Rebuild the tokenizer a GGUF describes from its `tokenizer.*` metadata values."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as TkTokenizer

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer type {kind!r} is not supported: lm_jax rebuilds byte-level BPE "
                "('gpt2') tokenizers; load the weights with from_gguf(path, tokenizer=False) and "
                "the tokenizer from a tokenizer.json folder (HFTokenizer.from_pretrained_dir)."
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges.")
        spelling = _bytes_to_unicode()
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
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and set(t) <= alphabet
        ]
        if control:
            tk.add_special_tokens(control)
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in vocab
        ]
        if user:
            tk.add_tokens(user)

        def tid(key):
            v = meta.get(f"tokenizer.ggml.{key}")
            return None if v is None else int(v)

        bos, eos, pad = tid("bos_token_id"), tid("eos_token_id"), tid("padding_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            b = [(tk.id_to_token(bos), bos)] if add_bos else []
            e = [(tk.id_to_token(eos), eos)] if add_eos else []
            pre = "".join(f"{t} " for t, _ in b)
            post = "".join(f" {t}" for t, _ in e)
            tk.post_processor = processors.TemplateProcessing(
                single=f"{pre}$A{post}", pair=f"{pre}$A{post} {pre}$B{post}",
                special_tokens=b + e,
            )  # fmt: skip
        return cls(tk, bos, eos, pad, meta.get("tokenizer.chat_template"))


def _load_tokenizer_json(directory: str):
    from tokenizers import Tokenizer as TkTokenizer

    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise TokenizerError(
            f"{path!r} not found: HFTokenizer needs a `tokenizers` tokenizer.json (save one "
            "with `tokenizer.save_pretrained(dir)` in transformers)."
        )
    try:
        tk = TkTokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a generic Exception
        raise TokenizerError(f"corrupt tokenizer file {path!r}: {e}") from e
    # Padding / truncation saved in tokenizer.json (all-MiniLM-L6-v2's: fixed 128) are off, as
    # transformers encodes by default: callers pad and truncate themselves.
    tk.no_padding()
    tk.no_truncation()
    return tk
