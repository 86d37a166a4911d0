"""Hugging Face `tokenizers` tokenizers: from a `tokenizer.json` folder or a GGUF's metadata.

`HFTokenizer` wraps a `tokenizers.Tokenizer` (whatever `tokenizer.json` describes: BPE,
unigram, WordPiece) plus the special token ids and the chat template (a jinja2 template rendered
as transformers does: `lm_jax.data.chat_template.render_chat`).

From a GGUF (`HFTokenizer.from_gguf_metadata`) the tokenizer its metadata describes is rebuilt
by `lm_jax.data.gguf_tokenizer` (byte-level BPE, or SentencePiece BPE with byte fallback).
"""

from __future__ import annotations

import json
import os

from lm_jax.data.chat_template import render_chat
from lm_jax.data.gguf_tokenizer import build_from_gguf_metadata
from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


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
        """Rebuild the tokenizer a GGUF describes from its `tokenizer.*` metadata values
        (`lm_jax.data.gguf_tokenizer`: byte-level BPE or SentencePiece BPE)."""
        return cls(*build_from_gguf_metadata(meta))


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
