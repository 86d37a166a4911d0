r"""Sampling for alignment: the KV-cache generator (tokens + log pi in one pass) against
recomputing the full forward for every new token (no cache).

  python benchmarks/align_sampling.py --batch=32 --new_tokens=96
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import machine, timeit
from lm_jax.configs import gpt2_style
from lm_jax.generate import generate
from lm_jax.nn import Transformer

flags.DEFINE_integer("batch", 32, "Samples per call.")
flags.DEFINE_integer("new_tokens", 96, "Tokens sampled per sample.")
flags.DEFINE_integer("repeat", 3, "Timed calls (median).")


@functools.partial(jax.jit, static_argnames=("cfg", "n"))
def recompute_sample(params, prompt, key, *, cfg, n: int):
    """Ancestral sampling with a full forward over the whole buffer per token: O(T^2)."""
    B, P = prompt.shape
    buf = jnp.zeros((B, P + n), jnp.int32).at[:, :P].set(prompt)
    model = Transformer(cfg)

    def body(i, carry):
        buf, lp = carry
        logits = model.apply({"params": params}, buf)[:, P + i - 1]  # [B, V] (causal: pads unseen)
        logp = jax.nn.log_softmax(logits)
        tok = jax.random.categorical(jax.random.fold_in(key, i), logp)
        lp = lp + jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]
        return buf.at[:, P + i].set(tok), lp

    return jax.lax.fori_loop(0, n, body, (buf, jnp.zeros((B,), jnp.float32)))


def main(_):
    F = flags.FLAGS
    cfg = gpt2_style(vocab_size=65, d_model=192, num_layers=4, num_heads=6, max_len=128)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    prompt = np.zeros((F.batch, 1), np.int32)
    key, n = jax.random.key(1), F.new_tokens
    cached = lambda: jax.block_until_ready(generate(cfg, params, prompt, key, n).tokens)  # noqa: E731
    full = lambda: jax.block_until_ready(  # noqa: E731
        recompute_sample(params, jnp.asarray(prompt), key, cfg=cfg, n=n)
    )
    cached(), full()  # compile
    t_c, t_f = timeit(cached, F.repeat), timeit(full, F.repeat)
    toks = F.batch * n
    print(f"machine: {machine()}; model d=192 L=4 (default preset), batch {F.batch}, {n} tokens")
    print("| sampler | s / call | tokens / s |\n|---|---|---|")
    print(f"| KV cache (lm_jax.generate) | {t_c:.3f} | {toks / t_c:,.0f} |")
    print(f"| full forward per token | {t_f:.3f} | {toks / t_f:,.0f} |")
    print(f"speed-up: {t_f / t_c:.1f}x")


if __name__ == "__main__":
    app.run(main)
