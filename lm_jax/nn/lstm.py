"""A word-level LSTM language model (Zaremba et al. 2014): embedding, stacked LSTM layers
(`flax.linen.RNN` over `OptimizedLSTMCell`), dropout on the non-recurrent connections, and an
untied softmax layer. The recurrent state is an explicit input and output, so truncated BPTT
carries it from one window to the next and evaluation carries it over a whole split.

Carry: a tuple of `num_layers` (c [B, H], h [B, H]) pairs (`zero_carry`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax.configs.lstm import LSTMConfig


def symmetric_uniform(scale: float):
    """Initializer U(-scale, scale) (Zaremba et al.: every parameter, biases included)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def zero_carry(cfg: LSTMConfig, batch: int):
    """The initial state: zeros for every layer's (c, h) [B, H]."""
    z = jnp.zeros((batch, cfg.hidden), jnp.float32)
    return tuple((z, z) for _ in range(cfg.num_layers))


class LSTMLM(nn.Module):
    """tokens [B, T] int32, carry -> (logits [B, T, V] float32, new carry)."""

    cfg: LSTMConfig

    @nn.compact
    def __call__(self, tokens, carry, deterministic: bool = True):
        cfg = self.cfg
        init = symmetric_uniform(cfg.init_scale)
        x = nn.Embed(cfg.vocab_size, cfg.hidden, embedding_init=init, name="embed")(tokens)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        new_carry = []
        for layer in range(cfg.num_layers):
            cell = nn.OptimizedLSTMCell(
                cfg.hidden, kernel_init=init, recurrent_kernel_init=init, bias_init=init,
                name=f"lstm_{layer}",
            )  # fmt: skip
            c, x = nn.RNN(cell)(
                x, initial_carry=carry[layer], return_carry=True
            )
            new_carry.append(c)
            x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        logits = nn.Dense(cfg.vocab_size, kernel_init=init, bias_init=init, name="softmax")(x)
        return logits.astype(jnp.float32), tuple(new_carry)
