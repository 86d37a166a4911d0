"""Perplexity cost of compressing SmolLM2-135M's Dense kernels (issue 11, item 6).

  .venv/bin/python -m benchmarks.compression_cost --max_tokens=8192 --window=256

Variants (`lm_jax.compression`, applied to the q/k/v/o and gate/up/down kernels of all 30
layers; embeddings, norms and the tied head untouched): dense, magnitude pruning at 25% and
50% per matrix, 2:4 structured pruning (50%), int8 per-output-channel weights (quantized then
dequantized to f32 for the forward). Perplexity over the first `max_tokens` scored tokens of the
nanoGPT validation split of Tiny Shakespeare (last 10% of characters), non-overlapping windows.
The base weights are the Q4_1 GGUF dequantized to f32, so "dense" is already 4-bit-quantized.
"""

from __future__ import annotations

import datetime
import json
import time

from absl import app, flags

flags.DEFINE_integer("max_tokens", 8192, "Scored tokens per variant.")
flags.DEFINE_integer("window", 256, "Context window (non-overlapping).")
flags.DEFINE_integer("batch", 4, "Windows per batch.")
flags.DEFINE_string("data", "../shared/data/tinyshakespeare/input.txt", "Text.")
flags.DEFINE_list(
    "variants", ["dense", "magnitude_25", "magnitude_50", "2:4", "int8"], "Variants to score."
)
flags.DEFINE_string("json_out", "", "Also write the rows as JSON here.")
FLAGS = flags.FLAGS


def compress(params, variant: str):
    from lm_jax import compression as c

    if variant == "dense":
        return params
    if variant.startswith("magnitude_"):
        return c.magnitude_prune(params, int(variant.split("_")[1]) / 100)
    if variant == "2:4":
        return c.prune_2_4(params)
    if variant == "int8":
        return c.dequantize_params(c.quantize_params(params))
    raise ValueError(f"unknown variant {variant!r}: use dense, magnitude_<pct>, 2:4 or int8")


def main(_):
    import jax

    from benchmarks.common import machine
    from lm_jax.compression import sparsity_of
    from lm_jax.convert import from_gguf
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.eval.perplexity import perplexity

    cfg, params, tok = from_gguf(smollm2_gguf_path())
    params = jax.device_put(params)
    with open(FLAGS.data, encoding="utf-8") as f:
        text = f.read()
    val = text[int(0.9 * len(text)) :]
    rows = []
    for v in FLAGS.variants:
        t = time.perf_counter()
        p = compress(params, v)
        res = perplexity(
            cfg, p, tok, val, window=FLAGS.window, batch_size=FLAGS.batch,
            max_tokens=FLAGS.max_tokens,
        )  # fmt: skip
        row = {
            "variant": v,
            "kernel_sparsity": sparsity_of(p),
            "perplexity": res.perplexity,
            "bits_per_byte": res.bits_per_byte,
            "tokens": res.tokens,
            "seconds": time.perf_counter() - t,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["perplexity"] if rows[0]["variant"] == "dense" else None
    print(f"\n{datetime.date.today()}, {machine()}; SmolLM2-135M, Tiny Shakespeare validation")
    print("| variant | kernel sparsity | perplexity | change vs dense | bits per byte |")
    print("|---|---|---|---|---|")
    for r in rows:
        d = f"{100 * (r['perplexity'] / base - 1):+.1f}%" if base else "-"
        print(
            f"| {r['variant']} | {100 * r['kernel_sparsity']:.1f}% | {r['perplexity']:.2f} | {d} "
            f"| {r['bits_per_byte']:.3f} |"
        )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"date": str(datetime.date.today()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
