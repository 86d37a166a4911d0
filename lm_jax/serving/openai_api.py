"""The OpenAI API's request and response shapes, over the engine's token ids.

Request bodies (`CompletionBody`, `ChatBody`) are pydantic models with the fields the OpenAI API
documents that this server honours (unknown fields are ignored, as OpenAI's servers do); `top_k`
is an extension. `Decoder` turns a stream of token ids into text deltas: it holds back an
incomplete UTF-8 character and any tail that could still become a stop string, so streamed
pieces join to exactly the non-streamed text. The `*_json` helpers build the response objects.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

Stop = str | list[str] | None


class _Sampling(BaseModel):
    model: str = ""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension: 0 = off
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: Stop = None
    seed: int | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop must be up to 4 non-empty strings.")
    return stops


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --------------------------------------------------------------------------- text from tokens


class Decoder:
    """Incremental detokenisation with stop strings.

    push(token) -> the new text that is final (may be ''); `stopped` once a stop string
    appeared (the text ends before it); finish() -> what was held back."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # all final text so far
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def _full(self) -> str:
        return self.tok.decode(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        full = self._full()
        for s in self.stops:
            at = full.find(s, max(len(self.text) - len(s), 0))
            if at >= 0:
                self.stopped = True
                return self._advance(full[:at])
        if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its rest
            return ""
        return self._advance(full[: max(len(full) - self._hold, len(self.text))])

    def _advance(self, upto: str) -> str:
        new = upto[len(self.text) :] if upto.startswith(self.text) else ""
        self.text += new
        return new

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._advance(self._full())


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([int(token)])


# --------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokenizer, tokens, logprobs, tops, offset0: int) -> dict:
    """The completions API's logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": texts,
        "token_logprobs": [float(x) for x in logprobs],
        "top_logprobs": [{token_text(tokenizer, i): float(v) for i, v in top} for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, tokens, logprobs, tops) -> dict:
    """The chat API's logprobs object: content = [{token, logprob, bytes, top_logprobs}]."""

    def entry(t, lp):
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": float(lp), "bytes": list(s.encode("utf-8"))}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
            for t, lp, top in zip(tokens, logprobs, tops)
        ]
    }


def response_json(rid: str, model: str, choices: list[dict], use: dict, chat: bool) -> dict:
    """A whole (non-streamed) completion or chat completion."""
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chunk_json(rid: str, model: str, chat: bool, choice: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def error_json(message: str, kind: str = "invalid_request_error", param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
