"""Speculative decoding vs plain decoding, SmolLM2-135M-Instruct (GGUF, f32), batch 1, greedy.

Three chat prompts: `copy` (repeat a paragraph), `edit` (rename a variable in a short function:
the answer mostly copies the prompt) and `story` (open-ended, little to copy). Methods:
  plain   `lm_jax.generate` greedy;
  ngram   `speculative_generate` with prompt lookup (--lookahead, --max_ngram);
  layers  `speculative_generate` with the model's first --draft_layers blocks as the draft.
Every method must give the same tokens (greedy speculation is exact); reported per prompt:
tokens/s of each (median over rounds, order alternating, each after a warm-up that compiles),
the ratio to plain, the share of drafts accepted and generated tokens per target forward, with
the matmul probe beside them as a load check.

  .venv/bin/python -m benchmarks.speculative --rounds=3
"""

from __future__ import annotations

import datetime
import json
import time

import numpy as np
from absl import app, flags

from benchmarks.common import machine, matmul_peak_flops, median

flags.DEFINE_integer("rounds", 3, "Timing rounds (order alternates).")
flags.DEFINE_integer("new_tokens", 128, "New tokens at most per prompt.")
flags.DEFINE_integer("lookahead", 4, "Tokens proposed per target forward.")
flags.DEFINE_integer("max_ngram", 3, "Prompt lookup: the longest suffix matched.")
flags.DEFINE_integer("draft_layers", 10, "Blocks of the layer draft (SmolLM2 has 30).")
flags.DEFINE_list("prompts", ["copy", "edit", "story"], "Which prompts.")
flags.DEFINE_string("out", "", "Write the result JSON here too.")
FLAGS = flags.FLAGS

PARAGRAPH = (
    "The river rises in the hills above the town and runs north through the valley for forty "
    "miles before it reaches the sea. In spring the snow melts and the water is high and fast; "
    "in late summer it is slow and clear, and children swim in the pools below the old mill."
)
FUNCTION = """def total_price(items, tax_rate):
    subtotal = 0.0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
"""
PROMPTS = {
    "copy": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "edit": f"Rename the variable `subtotal` to `net` in this function and show the whole "
    f"function:\n\n{FUNCTION}",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def main(argv):
    import jax

    from lm_jax.convert import from_gguf
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.generate import generate
    from lm_jax.speculative import SpeculativeConfig, layer_draft, speculative_generate

    cfg, params, tok = from_gguf(smollm2_gguf_path())
    params = jax.device_put(params)
    dcfg, dparams = layer_draft(cfg, params, FLAGS.draft_layers)
    stop = (tok.eos_id,)
    N = FLAGS.new_tokens
    key = jax.random.key(0)
    k = FLAGS.lookahead

    def run(method, ids):
        if method == "plain":
            out = generate(cfg, params, [ids], key, N, 0.0, stop_tokens=stop)
            jax.block_until_ready(out)
            return out, None
        if method == "ngram":
            spec = SpeculativeConfig(k, "ngram", FLAGS.max_ngram)
            out = speculative_generate(cfg, params, [ids], key, N, spec, temperature=0.0,
                                       stop_tokens=stop)  # fmt: skip
        else:
            spec = SpeculativeConfig(k, "draft")
            out = speculative_generate(cfg, params, [ids], key, N, spec, dcfg, dparams,
                                       temperature=0.0, stop_tokens=stop)  # fmt: skip
        jax.block_until_ready(out)
        return out.output, out

    methods = ["plain", "ngram", "layers"]
    results = {}
    for name in FLAGS.prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": PROMPTS[name]}], add_generation_prompt=True
        )
        ids = tok.encode(text, add_special_tokens=False)
        outs = {m: run(m, ids) for m in methods}  # warm-up: compiles
        ref = np.asarray(outs["plain"][0].tokens[0])
        n_tok = int(outs["plain"][0].lengths[0])
        same = {m: bool((np.asarray(outs[m][0].tokens[0]) == ref).all()) for m in methods}
        times = {m: [] for m in methods}
        probes = []
        for r in range(FLAGS.rounds):
            probes.append(matmul_peak_flops(512, 3) / 1e9)
            for m in methods if r % 2 == 0 else methods[::-1]:
                t = time.perf_counter()
                run(m, ids)
                times[m].append(time.perf_counter() - t)
        row = {"prompt_tokens": len(ids), "new_tokens": n_tok, "same_tokens": same,
               "probe_gflops": [round(p, 1) for p in probes]}  # fmt: skip
        for m in methods:
            tps = [n_tok / t for t in times[m]]
            row[m] = {"tokens_per_s": round(median(tps), 2), "rounds": [round(x, 2) for x in tps]}
            if outs[m][1] is not None:
                row[m]["acceptance"] = round(outs[m][1].acceptance, 3)
                row[m]["tokens_per_forward"] = round(outs[m][1].tokens_per_round, 2)
                row[m]["speedup"] = round(median(times["plain"]) / median(times[m]), 2)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct (GGUF dequantized to f32)",
        "lookahead": k,
        "max_ngram": FLAGS.max_ngram,
        "draft_layers": FLAGS.draft_layers,
        "results": results,
    }
    print(json.dumps(report, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)
    sample = tok.decode([int(t) for t in ref[:n_tok] if int(t) not in stop])
    print("last prompt's output:", sample[:400])


if __name__ == "__main__":
    app.run(main)
