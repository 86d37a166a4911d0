"""Per-request LoRA in the continuous-batching engine: what the adapter bank costs, and what it
saves against one engine per adapter.

SmolLM2-135M (GGUF, f32), greedy, `--requests` requests of mixed prompt (4-60 tokens of the
embedded Shakespeare) and output lengths (16-48 tokens), `--slots` slots. Two random adapter
sets, rank `--rank` on every default target (attention q/k/v/o and the MLP), B drawn at random
(trained-looking). Configurations, each timed over the same requests:

  base          no bank; every request on the base model
  bank/base     the bank of 2 adapters loaded, every request on the base (the row path's cost)
  bank/mixed    the bank, requests spread over base, adapter 1, adapter 2 (one running batch)
  per-adapter   what serving them needs without the bank: one engine per model (merged
                weights), all requests submitted at once, the engines stepped in turn (a
                server with one engine per adapter); each batch holds one model's requests

in rounds whose order alternates, after a warm-up that compiles every program. Reported:
generated tokens/s of each (median over rounds), the ratios to `base`, the matmul probe, and
whether bank/mixed gives the same tokens as per-adapter for every request.

  .venv/bin/python -m benchmarks.engine_adapters --rounds=3
"""

from __future__ import annotations

import datetime
import json
import time

import numpy as np
from absl import app, flags

from benchmarks.common import machine, matmul_peak_flops, median

flags.DEFINE_integer("rounds", 3, "Timing rounds (order alternates).")
flags.DEFINE_integer("requests", 12, "Requests per configuration (split over 3 models).")
flags.DEFINE_integer("slots", 8, "Engine slots.")
flags.DEFINE_integer("rank", 8, "LoRA rank of both adapters.")
flags.DEFINE_string("out", "", "Write the result JSON here too.")
FLAGS = flags.FLAGS
CONFIGS = ("base", "bank/base", "bank/mixed", "per-adapter")


def _requests(tok, n: int):
    from lm_jax.data.sources import read_text, shakespeare_files

    words = read_text(shakespeare_files()[0])[:200_000].split()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        start = int(rng.integers(0, len(words) - 100))
        ids = tok.encode(" ".join(words[start : start + int(rng.integers(3, 45))]))[:60]
        out.append((ids, int(rng.integers(16, 49))))
    return out


def main(_):

    from lm_jax import adapters as L
    from lm_jax.adapters.rows import random_adapters
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.convert.sources import load_any
    from lm_jax.serving.engine import Engine, EngineConfig, Request

    cfg, params, tok, _ = load_any(gguf=smollm2_gguf_path())
    lora = L.LoraConfig(rank=FLAGS.rank, alpha=2.0 * FLAGS.rank)
    sets = {f"a{i}": (random_adapters(params, lora, seed=i), lora) for i in (1, 2)}
    merged = {"": params}
    for n, (ad, lc) in sets.items():
        merged[n] = L.merge(L.combine(params, ad), cfg.replace(lora=lc))
    ecfg = EngineConfig(slots=FLAGS.slots, max_len=128, decode_steps=4)
    work = _requests(tok, FLAGS.requests)
    names = ["", "a1", "a2"]

    def reqs(mixed: bool):
        return [Request(ids, max_tokens=n, temperature=0.0, adapter=names[i % 3] if mixed else "")
                for i, (ids, n) in enumerate(work)]  # fmt: skip

    engines = {
        "base": Engine(cfg, params, ecfg),
        "bank": Engine(cfg, params, ecfg, adapters=sets),
        **{f"m:{n}": Engine(cfg, merged[n], ecfg) for n in names},
    }

    def run(name):
        """(generated tokens, seconds, tokens per request)."""
        t = time.perf_counter()
        if name == "per-adapter":
            out = [[] for _ in work]
            rid = {}
            for i, (ids, n_new) in enumerate(work):
                eng = engines[f"m:{names[i % 3]}"]
                rid[(names[i % 3], eng.add(Request(ids, max_tokens=n_new, temperature=0.0)))] = i
            while any(engines[f"m:{n}"].busy for n in names):
                for n in names:  # one decode dispatch of each busy engine in turn
                    if engines[f"m:{n}"].busy:
                        for ev in engines[f"m:{n}"].step():
                            if ev.token >= 0:
                                out[rid[(n, ev.rid)]].append(ev.token)
        else:
            eng = engines["base" if name == "base" else "bank"]
            out = [c.tokens for c in eng.run(reqs(name == "bank/mixed"))]
        return sum(map(len, out)), time.perf_counter() - t, out

    for name in CONFIGS:  # warm-up: compiles every program
        run(name)
    rates = {n: [] for n in CONFIGS}
    probes, same = [], True
    for r in range(FLAGS.rounds):
        probes.append(matmul_peak_flops() / 1e9)
        outs = {}
        for name in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
            n_tok, secs, outs[name] = run(name)
            rates[name].append(n_tok / secs)
        same &= outs["bank/mixed"] == outs["per-adapter"] and outs["bank/base"] == outs["base"]
    med = {n: median(v) for n, v in rates.items()}
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "requests": FLAGS.requests, "slots": FLAGS.slots, "rank": FLAGS.rank,
        "tokens_per_s": {n: round(v, 1) for n, v in med.items()},
        "rounds": {n: [round(x, 1) for x in v] for n, v in rates.items()},
        "ratio_to_base": {n: round(v / med["base"], 3) for n, v in med.items()},
        "matmul_gflops": [round(p, 1) for p in probes],
        "same_tokens": bool(same),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
