"""Prefill cost: one full forward (logits [B, T, V], then the last row kept) against
`lm_jax.prefill.prefill` (the LM head at the last position only; chunked or not), on real
pretrained models, in alternating rounds; medians and ratios.

    python -m benchmarks.prefill --models=smollm2,gemma3 --length=256 --rounds=3
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lm_jax.convert.gguf import from_gguf, gemma3_gguf_path, smollm2_gguf_path
from lm_jax.nn.transformer import Transformer, init_cache
from lm_jax.prefill import prefill

flags.DEFINE_list("models", ["smollm2", "gemma3"], "smollm2 and/or gemma3 (the GGUFs of DATA.md).")
flags.DEFINE_integer("length", 256, "Prompt tokens.")
flags.DEFINE_integer("batch", 1, "Prompts per call.")
flags.DEFINE_integer("chunk", 128, "Window of the chunked variant.")
flags.DEFINE_integer("rounds", 3, "Rounds (variants alternate within a round).")
flags.DEFINE_integer("reps", 3, "Timed calls per variant per round.")
FLAGS = flags.FLAGS


def variants(cfg, params, B, T):
    model = Transformer(cfg)
    last = jnp.full((B,), T - 1, jnp.int32)

    @jax.jit
    def full(p, toks):
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        logits, cache = model.apply({"params": p}, toks, pos, cache=init_cache(cfg, B, T))
        return logits[:, -1], cache

    def ours(chunk):
        return jax.jit(lambda p, t: prefill(model, p, t, init_cache(cfg, B, T), last, chunk=chunk))

    return {"full forward": full, "last-position head": ours(0),
            f"last-position head, chunk {FLAGS.chunk}": ours(FLAGS.chunk)}  # fmt: skip


def main(_):
    B, T = FLAGS.batch, FLAGS.length
    paths = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}
    print("| model | variant | ms per prefill (median) | x full forward | max |diff| |")
    print("|---|---|---|---|---|")
    for name in FLAGS.models:
        cfg, params = from_gguf(paths[name](), tokenizer=False)[:2]  # random token ids
        params = jax.device_put(params)
        toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
        fns = variants(cfg, params, B, T)
        times = {k: [] for k in fns}
        outs = {k: np.asarray(jax.block_until_ready(f(params, toks))[0]) for k, f in fns.items()}
        ref = outs["full forward"]  # (compiles every variant, and checks they agree)
        diffs = {k: float(np.abs(out - ref).max()) for k, out in outs.items()}
        for r in range(FLAGS.rounds):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                for _ in range(FLAGS.reps):
                    t = time.perf_counter()
                    jax.block_until_ready(fns[k](params, toks))
                    times[k].append(time.perf_counter() - t)
        base = statistics.median(times["full forward"])
        for k in fns:
            m = statistics.median(times[k])
            print(f"| {name} | {k} | {1e3 * m:.0f} | {base / m:.2f}x | {diffs[k]:.1e} |")


if __name__ == "__main__":
    app.run(main)
