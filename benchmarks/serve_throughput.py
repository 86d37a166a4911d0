"""Continuous batching through the HTTP server: 32 concurrent requests vs one at a time.

SmolLM2-135M (GGUF, f32) behind `lm_jax.serving.app` on localhost, driven by the official
`openai` client. 32 greedy completions of mixed prompt lengths (4-60 tokens of the embedded
Shakespeare) and output lengths (16-64 tokens) are sent
  concurrent  all at once to a server with --slots slots (default 32);
  one-by-one  one after another to a 1-slot server (the best single-request path: one row per
              decode step);
in rounds whose order alternates, each after a warm-up that compiles every program. Reported:
generated tokens/s of each, their ratio (median over rounds), the matmul probe beside them, and
whether every concurrent output equals the one-by-one output of the same request and
`lm_jax.generate` greedy output of its prompt alone.

  .venv/bin/python -m benchmarks.serve_throughput --rounds=3
"""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import app, flags

from benchmarks.common import machine, matmul_peak_flops, median

flags.DEFINE_integer("rounds", 3, "Timing rounds (order alternates).")
flags.DEFINE_integer("requests", 32, "Requests per round.")
flags.DEFINE_integer("slots", 32, "Slots of the concurrent server.")
flags.DEFINE_integer("decode_steps", 4, "Tokens per decode dispatch.")
flags.DEFINE_integer("max_len", 256, "Engine max_len (cache length).")
flags.DEFINE_string("out", "", "Write the result JSON here too.")
FLAGS = flags.FLAGS


def _workload(tok, n: int, seed: int = 0):
    from lm_jax.data.sources import read_text, shakespeare_files

    words = read_text(shakespeare_files()[0])[:200_000].split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(0, len(words) - 100))
        prompt = " ".join(words[start : start + int(rng.integers(3, 45))])
        ids = tok.encode(prompt)[:60]
        out.append((tok.decode(ids), int(rng.integers(16, 65))))
    return out


class _Server:
    def __init__(self, cfg, params, tok, slots: int):
        import uvicorn

        from lm_jax.serving.app import make_app
        from lm_jax.serving.engine import Engine, EngineConfig
        from lm_jax.serving.runner import Runner

        ecfg = EngineConfig(slots=slots, max_len=FLAGS.max_len, decode_steps=FLAGS.decode_steps)
        self.engine = Engine(cfg, params, ecfg)
        self.runner = Runner(self.engine, max_pending=4 * FLAGS.requests).start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(
            uvicorn.Config(make_app(self.runner, tok, "m"), port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
        self.runner.close()


def _ask(client, prompt, n):
    r = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text, r.usage.completion_tokens


def _run(url, work, concurrent: bool):
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    t = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(work)) as pool:
            got = list(pool.map(lambda w: _ask(client, *w), work))
    else:
        got = [_ask(client, *w) for w in work]
    secs = time.perf_counter() - t
    return [g[0] for g in got], sum(g[1] for g in got) / secs


def main(argv):
    import logging

    import jax

    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.convert.sources import load_any
    from lm_jax.generate import generate

    cfg, params, tok, _ = load_any(gguf=smollm2_gguf_path())
    work = _workload(tok, FLAGS.requests)
    many = _Server(cfg, params, tok, FLAGS.slots)
    one = _Server(cfg, params, tok, 1)
    for srv in (many, one):  # warm-up: compiles every prefill bucket and the decode step
        _run(srv.url, work, True)
    rates = {"concurrent": [], "one_by_one": []}
    texts = {}
    probe = []
    for r in range(FLAGS.rounds):
        order = ["concurrent", "one_by_one"] if r % 2 == 0 else ["one_by_one", "concurrent"]
        probe.append(matmul_peak_flops() / 1e9)
        for mode in order:
            url = many.url if mode == "concurrent" else one.url
            texts[mode], rate = _run(url, work, mode == "concurrent")
            rates[mode].append(rate)
            print(f"round {r}: {mode} {rate:.1f} tokens/s", flush=True)
    many.stop()
    one.stop()
    alone = []
    for prompt, n in work:
        ids = tok.encode(prompt)
        g = generate(cfg, params, [ids], jax.random.key(0), n, 0.0, stop_tokens=(tok.eos_id,))
        toks = [int(x) for x in np.asarray(g.tokens[0, : int(g.lengths[0])]) if x != tok.eos_id]
        alone.append(tok.decode(toks))
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct (GGUF dequantized to f32)",
        "requests": FLAGS.requests,
        "slots": FLAGS.slots,
        "decode_steps": FLAGS.decode_steps,
        "concurrent_tokens_per_s": [round(x, 1) for x in rates["concurrent"]],
        "one_by_one_tokens_per_s": [round(x, 1) for x in rates["one_by_one"]],
        "ratio_median": round(median(rates["concurrent"]) / median(rates["one_by_one"]), 2),
        "matmul_probe_gflops": [round(x, 1) for x in probe],
        "concurrent_equals_one_by_one": texts["concurrent"] == texts["one_by_one"],
        "concurrent_equals_generate_alone": texts["concurrent"] == alone,
    }
    print(json.dumps(res, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    app.run(main)
