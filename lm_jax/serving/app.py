"""An OpenAI-compatible HTTP API over a `Runner`: /v1/models, /v1/completions,
/v1/chat/completions (streaming as server-sent events, logprobs, n, stop strings, seed).

    app = make_app(runner, tokenizer, model_name="smollm2-135m")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Errors are OpenAI-shaped JSON (`{"error": {"message", "type", ...}}`): a malformed or
impossible request gets 400 naming the field and the fix, an unknown model 404, a full queue 429,
a draining or failed server 503; none of them disturbs the requests already running. A client
that disconnects mid-stream has its requests cancelled, freeing their slots.

LoRA adapters the engine holds (`Engine(..., adapters=...)`, `serve.py --adapters=name=dir`) are
served as models of their own: /v1/models lists each under its name with `parent` the base, and
a request's `model` picks one; requests on different adapters share the running batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from lm_jax.serving import openai_api as oa
from lm_jax.serving.engine import Event
from lm_jax.serving.engine import Request as EngineRequest
from lm_jax.serving.runner import Overloaded, Runner, ShuttingDown

CHAT_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


class ClientError(ValueError):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def _stop_tokens(tokenizer, chat: bool) -> tuple[int, ...]:
    ids = set() if tokenizer.eos_id is None else {int(tokenizer.eos_id)}
    lookup = getattr(tokenizer, "token_to_id", None)
    if chat and lookup is not None:
        ids |= {i for i in (lookup(m) for m in CHAT_END_MARKERS) if i is not None}
    return tuple(sorted(ids))


class _Stream:
    """One engine request seen from the event loop: events arrive on an asyncio queue."""

    def __init__(self, runner: Runner, req: EngineRequest, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.runner = runner
        self.rid = runner.submit(
            req, lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        )

    async def events(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.queue.get()
            yield ev
            if ev.finish is not None:
                return


def make_app(runner: Runner, tokenizer, model_name: str, chat_template: str | None = None):
    """FastAPI app serving `runner` (its engine's model) under the id `model_name`, and each of
    the engine's adapters under its own name. `chat_template`: jinja2 source for chat prompts
    (default: the tokenizer's own)."""
    adapters = list(getattr(runner.engine, "adapter_names", ()))
    if model_name in adapters:
        raise ValueError(f"adapter name {model_name!r} is the base model's id: rename it.")
    app = FastAPI(title="lm_jax", version="0.1")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))
        return JSONResponse(oa.error_json(msg, param=loc or None), status_code=400)

    @app.exception_handler(ClientError)
    async def _client(_, exc: ClientError):
        return JSONResponse(oa.error_json(str(exc), exc.kind), status_code=exc.status)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "lm_jax"}
        cards = [card] + [{**card, "id": a, "parent": model_name} for a in adapters]
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health():
        ok = runner.accepting
        body = {"status": "ok" if ok else "draining", "pending": runner.pending}
        return JSONResponse(body, status_code=200 if ok else 503)

    def check_model(name: str) -> tuple[str, str]:
        """(the model id to answer with, the engine adapter: '' = the base)."""
        if not name or name == model_name:
            return model_name, ""
        if name in adapters:
            return name, name
        served = ", ".join(repr(m) for m in [model_name, *adapters])
        raise ClientError(
            f"model {name!r} is not served here; this server serves {served} (GET /v1/models).",
            404, "model_not_found",
        )  # fmt: skip

    def checked(body) -> tuple[list[str], str, str]:
        """The body's stop strings, model id and adapter (the model checked)."""
        model_id, adapter = check_model(body.model)
        try:
            return oa.stop_list(body.stop), model_id, adapter
        except ValueError as e:
            raise ClientError(str(e)) from None

    def engine_request(body, prompt: list[int], max_tokens, logprobs: int, stop_ids, i: int,
                       adapter: str = ""):  # fmt: skip
        if max_tokens is None:  # as many as fit
            max_tokens = runner.engine.ecfg.max_len - len(prompt)
        seed = None if body.seed is None else body.seed + i
        return EngineRequest(
            prompt, int(max_tokens), body.temperature, body.top_k, body.top_p, seed,
            stop_ids, logprobs, adapter,
        )  # fmt: skip

    def start(reqs: list[EngineRequest]) -> list[_Stream]:
        loop = asyncio.get_running_loop()
        streams = []
        try:
            for r in reqs:
                streams.append(_Stream(runner, r, loop))
        except (ValueError, Overloaded, ShuttingDown) as e:
            for s in streams:
                runner.cancel(s.rid)
            if isinstance(e, Overloaded):
                raise ClientError(str(e), 429, "rate_limit_exceeded") from None
            if isinstance(e, ShuttingDown):
                raise ClientError(str(e), 503, "service_unavailable") from None
            raise ClientError(str(e)) from None
        return streams

    async def collect(stream: _Stream, stops: list[str]):
        dec = oa.Decoder(tokenizer, stops)
        toks, lps, tops, finish = [], [], [], None
        async for ev in stream.events():
            if ev.finish == "error":
                raise ClientError("the engine failed; see the server log.", 500, "server_error")
            if ev.token >= 0 and ev.finish != "stop" and not dec.stopped:
                toks.append(ev.token)
                lps.append(ev.logprob)
                tops.append(ev.top)
                dec.push(ev.token)
                if dec.stopped:
                    runner.cancel(stream.rid)
                    finish = "stop"
            if ev.finish is not None and finish is None:
                finish = "stop" if ev.finish == "stop" else "length"
        dec.finish()
        if dec.stopped:  # drop the tokens that make up the stop string from the logprobs
            n = len(dec.ids)
            while n > 0 and len(tokenizer.decode(dec.ids[:n])) > len(dec.text):
                n -= 1
            toks, lps, tops = toks[:n], lps[:n], tops[:n]
        return dec.text, toks, lps, tops, finish

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_response(
        streams, stops, rid, chat: bool, want_logprobs: bool, head=None, model_id=model_name
    ):
        """Server-sent events: the choices' deltas in the order their tokens come."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: _Stream):
            dec = oa.Decoder(tokenizer, stops)
            done = False
            async for ev in stream.events():
                if done:
                    continue
                if ev.finish == "error":
                    await queue.put((index, None, None, "error"))
                    return
                text, lp = "", None
                if ev.token >= 0 and ev.finish != "stop":
                    text = dec.push(ev.token)
                    if want_logprobs:
                        lp = (ev.token, ev.logprob, ev.top)
                    if dec.stopped:
                        runner.cancel(stream.rid)
                        done = True
                        await queue.put((index, text, None, "stop"))
                        continue
                if ev.finish is not None:
                    text += dec.finish()
                    finish = "stop" if ev.finish == "stop" else "length"
                    await queue.put((index, text, lp, finish))
                    done = True
                elif text or lp:
                    await queue.put((index, text, lp, None))
            await queue.put((index, None, None, "_end"))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        ended = 0
        try:
            if chat:
                for i in range(len(streams)):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}  # fmt: skip
                    yield sse(oa.chunk_json(rid, model_id, True, first))
            if head:
                for i, text in head.items():
                    c = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
                    yield sse(oa.chunk_json(rid, model_id, False, c))
            while ended < len(streams):
                index, text, lp, finish = await queue.get()
                if finish == "_end":
                    ended += 1
                    continue
                if finish == "error":
                    yield sse(
                        oa.error_json("the engine failed; see the server log.", "server_error")
                    )
                    return
                logprobs = None
                if lp is not None:
                    t, v, top = lp
                    if chat:
                        logprobs = oa.chat_logprobs(tokenizer, [t], [v], [top])
                    else:
                        logprobs = oa.completion_logprobs(tokenizer, [t], [v], [top], 0)
                if chat:
                    choice = {"index": index, "delta": {"content": text or ""},
                              "logprobs": logprobs, "finish_reason": finish}  # fmt: skip
                else:
                    choice = {"index": index, "text": text or "", "logprobs": logprobs,
                              "finish_reason": finish}  # fmt: skip
                yield sse(oa.chunk_json(rid, model_id, chat, choice))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the slots
            for s in streams:
                runner.cancel(s.rid)
            for t in tasks:
                t.cancel()

    def encode_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [tokenizer.encode(prompt)]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]
        if prompt and isinstance(prompt[0], list):
            return [list(p) for p in prompt]
        if not prompt:
            raise ClientError("prompt is empty: give a string, a list of strings or token ids.")
        return [tokenizer.encode(p) for p in prompt]

    @app.post("/v1/completions")
    async def completions(body: oa.CompletionBody):
        stops, model_id, adapter = checked(body)
        if body.echo and body.logprobs:
            raise ClientError("echo with logprobs (prompt log-probs) is not supported; "
                              "score prompts with lm_jax.eval.harness instead.")  # fmt: skip
        prompts = encode_prompts(body.prompt)
        stop_ids = _stop_tokens(tokenizer, chat=False)
        reqs = [
            engine_request(body, p, body.max_tokens, body.logprobs or 0, stop_ids, j, adapter)
            for p in prompts
            for j in range(body.n)
        ]
        rid = oa.new_id("cmpl")
        streams = start(reqs)
        echo = {}
        if body.echo:
            echo = {i: tokenizer.decode(reqs[i].prompt) for i in range(len(reqs))}
        if body.stream:
            gen = stream_response(
                streams, stops, rid, False, bool(body.logprobs), echo, model_id=model_id
            )
            return StreamingResponse(gen, media_type="text/event-stream")
        results = await _gather(streams, stops)
        choices, n_out = [], 0
        for i, (text, toks, lps, tops, finish) in enumerate(results):
            n_out += len(toks)
            lp = None
            if body.logprobs is not None:
                lp = oa.completion_logprobs(tokenizer, toks, lps, tops, len(echo.get(i, "")))
            choices.append({"index": i, "text": echo.get(i, "") + text, "logprobs": lp,
                            "finish_reason": finish})  # fmt: skip
        n_in = sum(len(p) for p in prompts)
        return oa.response_json(rid, model_id, choices, oa.usage(n_in, n_out), chat=False)

    async def _gather(streams, stops):
        try:
            return await asyncio.gather(*(collect(s, stops) for s in streams))
        finally:
            for s in streams:
                runner.cancel(s.rid)

    @app.post("/v1/chat/completions")
    async def chat(body: oa.ChatBody):
        stops, model_id, adapter = checked(body)
        messages = [m.model_dump() for m in body.messages]
        try:
            if chat_template is not None:
                from lm_jax.data.chat_template import render_chat

                text = render_chat(chat_template, messages, add_generation_prompt=True)
            else:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # a template's raise_exception (e.g. roles out of order)
            raise ClientError(f"messages cannot be rendered by the chat template: {e}") from None
        prompt = tokenizer.encode(text, add_special_tokens=False)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise ClientError("top_logprobs needs logprobs=true.")
        max_tokens = body.max_completion_tokens or body.max_tokens
        stop_ids = _stop_tokens(tokenizer, chat=True)
        reqs = [
            engine_request(body, prompt, max_tokens, top, stop_ids, j, adapter)
            for j in range(body.n)
        ]
        rid = oa.new_id("chatcmpl")
        streams = start(reqs)
        if body.stream:
            gen = stream_response(streams, stops, rid, True, body.logprobs, model_id=model_id)
            return StreamingResponse(gen, media_type="text/event-stream")
        results = await _gather(streams, stops)
        choices, n_out = [], 0
        for i, (text, toks, lps, tops, finish) in enumerate(results):
            n_out += len(toks)
            lp = oa.chat_logprobs(tokenizer, toks, lps, tops) if body.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": finish})  # fmt: skip
        return oa.response_json(rid, model_id, choices, oa.usage(len(prompt), n_out), chat=True)

    return app
