"""The OpenAI-compatible server, driven by the official `openai` client on localhost, over
SmolLM2-135M: completion and chat text equal `lm_jax.generate` greedy output of the prompt alone,
streaming joins to the same text, logprobs, n, stop strings, concurrent clients, malformed and
impossible requests (4xx JSON, server still up), overload (429), and a SIGTERM drain under load
in which no accepted request is lost."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import openai
import pytest
import uvicorn

from lm_jax.convert.gguf import smollm2_gguf_path
from lm_jax.convert.sources import load_any
from lm_jax.generate import generate
from lm_jax.serving.app import make_app
from lm_jax.serving.engine import Engine, EngineConfig
from lm_jax.serving.runner import Runner

MODEL = "smollm2-135m"
MAX_PENDING = 6


class _Server:
    def __init__(self, engine, tok, max_pending=MAX_PENDING):
        self.runner = Runner(engine, max_pending).start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        app = make_app(self.runner, tok, MODEL)
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
        self.runner.close(drain=True)


@pytest.fixture(scope="module")
def model():
    cfg, params, tok, _ = load_any(gguf=smollm2_gguf_path())
    return cfg, params, tok


@pytest.fixture(scope="module")
def server(model):
    cfg, params, tok = model
    engine = Engine(cfg, params, EngineConfig(slots=4, max_len=192, decode_steps=4))
    srv = _Server(engine, tok)
    yield srv
    srv.stop()


def _post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _greedy_text(model, ids, n, stop=()):
    cfg, params, tok = model
    out = generate(cfg, params, [ids], jax.random.key(0), n, 0.0, stop_tokens=stop)
    toks = [int(t) for t in np.asarray(out.tokens[0, : int(out.lengths[0])]) if t not in stop]
    return tok.decode(toks), out


def test_models_and_greedy_completion_equal_generate(server, model):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    tok = model[2]
    prompt = "The capital of France is"
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    ref, out = _greedy_text(model, tok.encode(prompt), 12, (tok.eos_id,))
    choice = r.choices[0]
    assert choice.text == ref and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 12
    lp = choice.logprobs
    assert "".join(lp.tokens) == ref
    np.testing.assert_allclose(lp.token_logprobs, np.asarray(out.logprobs[0, :12]), atol=1e-4)
    assert all(max(d.values()) == pytest.approx(v, abs=1e-5) for d, v in
               zip(lp.top_logprobs, lp.token_logprobs))  # fmt: skip
    # streaming joins to the same text; n=2 seeded samples differ from each other
    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == ref
    two = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2, seed=3)
    assert len(two.choices) == 2 and two.choices[0].text != two.choices[1].text
    again = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2, seed=3)
    assert [x.text for x in again.choices] == [x.text for x in two.choices]


def test_chat_stream_logprobs_and_stop_strings(server, model):
    c = server.client()
    tok = model[2]
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    r = c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2
    )
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), False)
    stops = tuple(sorted({tok.eos_id, tok.token_to_id("<|im_end|>")}))
    ref, _ = _greedy_text(model, ids, 24, stops)
    text = r.choices[0].message.content
    assert text == ref and r.choices[0].message.role == "assistant"
    content = r.choices[0].logprobs.content
    assert "".join(x.token for x in content) == text
    assert all(len(x.top_logprobs) == 2 for x in content)
    stream = c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == text
    cut = text.split()[2]  # a word inside the answer: the text ends just before it
    s = c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=24, temperature=0, stop=[cut]
    )
    assert s.choices[0].message.content == text[: text.index(cut)]
    assert s.choices[0].finish_reason == "stop"


def test_concurrent_clients_each_get_their_own_greedy_output(server, model):
    tok = model[2]
    prompts = ["Once upon a time", "The best way to", "Water boils at", "My name is"]
    c = server.client()

    def ask(p):
        return c.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, prompts))
    for p, r in zip(prompts, got):
        assert r.choices[0].text == _greedy_text(model, tok.encode(p), 10, (tok.eos_id,))[0]


def test_bad_requests_get_4xx_json_and_the_server_stays_up(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="lower max_tokens to at most"):
        c.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    status, body = _post(server.url + "/v1/completions", b"{not json")
    assert status == 400 and "error" in body
    status, body = _post(server.url + "/v1/chat/completions", b'{"messages": []}')
    assert status == 400 and "messages" in body["error"]["message"]
    ok = c.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_overload_gets_429_and_the_accepted_requests_finish(server):
    c = server.client()

    def ask(i):
        try:
            r = c.completions.create(model=MODEL, prompt=f"Count {i}", max_tokens=24)
            return r.choices[0].finish_reason
        except openai.RateLimitError:
            return 429

    with ThreadPoolExecutor(MAX_PENDING + 4) as pool:
        got = list(pool.map(ask, range(MAX_PENDING + 4)))
    assert got.count(429) >= 1
    assert all(g in ("length", "stop") for g in got if g != 429)


def test_serve_binary_rejects_bad_flags_in_one_line():
    for flag, match in [
        ("--engine.slots=0", "--engine.slots must be >= 1"),
        ("--serve.port=0", "--serve.port must be in 1..65535"),
        ("--adapters=/tmp/chat_sft", "is not name=dir"),
        ("--adapters=a=/nonexistent/run", "--adapters=a='/nonexistent/run' holds no LoRA"),
    ]:
        p = subprocess.run(
            [sys.executable, "experiments/serve.py", flag], capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert p.returncode == 2, p.stderr
        lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and match in lines[0], p.stderr


def test_sigterm_drains_in_flight_requests(server):
    """Under load, uvicorn's SIGTERM path (`handle_exit`) stops accepting; every request already
    accepted completes with 200, then the runner drains and stops."""
    import signal

    c = server.client()
    results = []

    def ask(i):
        r = c.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=20, temperature=0)
        results.append(r.choices[0].finish_reason)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while server.runner.pending < 4:
        time.sleep(0.01)
    server.server.handle_exit(signal.SIGTERM, None)
    for t in threads:
        t.join(120)
    server.thread.join(120)
    server.runner.close(drain=True)
    assert results == ["length"] * 4
    assert not server.thread.is_alive() and server.runner.pending == 0
    with pytest.raises(openai.APIConnectionError):
        c.completions.create(model=MODEL, prompt="late", max_tokens=2)


def test_adapters_are_models_of_their_own_in_one_running_batch(model):
    """--adapters: each adapter is a model id (parent: the base); its greedy completion equals
    `generate` of the model with that adapter merged, while base requests run beside it."""
    from lm_jax import adapters as L
    from lm_jax.adapters.rows import random_adapters

    cfg, params, tok = model
    lora = L.LoraConfig(rank=4, alpha=8.0, targets=(r"attn/[qv]_proj$",))
    ad = random_adapters(params, lora, std=0.05)
    merged = L.merge(L.combine(params, ad), cfg.replace(lora=lora))
    engine = Engine(cfg, params, EngineConfig(slots=4, max_len=96, decode_steps=4),
                    adapters={"rand": (ad, lora)})  # fmt: skip
    srv = _Server(engine, tok)
    try:
        c = srv.client()
        cards = c.models.list().data
        assert [m.id for m in cards] == [MODEL, "rand"]
        assert cards[1].model_dump().get("parent") == MODEL
        prompt = "Once upon a time"
        ids = tok.encode(prompt)
        ask = lambda m: c.completions.create(model=m, prompt=prompt, max_tokens=10, temperature=0)  # noqa: E731
        with ThreadPoolExecutor(4) as pool:  # adapter and base requests in one batch
            got = list(pool.map(ask, ["rand", MODEL, "rand", MODEL]))
        want_rand = _greedy_text((cfg, merged, tok), ids, 10, (tok.eos_id,))[0]
        want_base = _greedy_text(model, ids, 10, (tok.eos_id,))[0]
        assert want_rand != want_base  # the adapter changes the text
        assert [g.choices[0].text for g in got] == [want_rand, want_base] * 2
        assert [g.model for g in got] == ["rand", MODEL] * 2
        status, body = _post(srv.url + "/v1/completions",
                             json.dumps({"model": "other", "prompt": "x"}).encode())  # fmt: skip
        assert status == 404 and "'rand'" in body["error"]["message"]
    finally:
        srv.stop()
