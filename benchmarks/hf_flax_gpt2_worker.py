"""HF transformers' own Flax GPT-2 (`FlaxGPT2LMHeadModel`) training step, timed: a worker for
`benchmarks.train_throughput --hf_flax_python=...`.

transformers 5.x removed its Flax models, so this runs in a separate interpreter with
transformers < 5 and its Flax stack (jax, flax, optax), e.g.

  python3.11 -m venv /tmp/hfflax && /tmp/hfflax/bin/pip install "transformers==4.46.3" \\
      "flax==0.10.2" "jax[cpu]==0.4.38" "numpy<2.2"
  /tmp/hfflax/bin/python benchmarks/hf_flax_gpt2_worker.py --steps=4     # prints tokens/s

Standalone on purpose: it imports nothing from lm_jax. Same step as the other workers: GPT-2 config
(6 layers, d 384, 6 heads, vocab 8192, f32, no dropout), next-token cross-entropy, AdamW (lr 1e-3,
weight decay 0.1) after global-norm clipping at 1.0, one jitted step with donated state.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from transformers import FlaxGPT2LMHeadModel, GPT2Config

L, D, N, V = 6, 384, 6, 8192


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    B, T = a.batch, a.seq
    cfg = GPT2Config(
        vocab_size=V, n_embd=D, n_layer=L, n_head=N, n_positions=T,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = FlaxGPT2LMHeadModel(cfg, input_shape=(B, T), seed=0, dtype=jnp.float32)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    params = model.params
    opt_state = tx.init(params)
    toks = jax.random.randint(jax.random.PRNGKey(0), (B, T + 1), 0, V)

    def loss_fn(p, toks):
        logits = model(toks[:, :-1], params=p, train=True, dropout_rng=jax.random.PRNGKey(1))[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    def train_step(p, s, toks):
        loss, g = jax.value_and_grad(loss_fn)(p, toks)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))

    def run(n, p, s):
        for _ in range(n):
            p, s, loss = step(p, s, toks)
        loss.block_until_ready()
        return p, s

    params, opt_state = run(2, params, opt_state)  # compile + warm
    t = time.perf_counter()
    run(a.steps, params, opt_state)
    print(B * T * a.steps / (time.perf_counter() - t))


if __name__ == "__main__":
    main()
