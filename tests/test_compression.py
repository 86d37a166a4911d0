"""Pruning and int8 weights: exact sparsity patterns, bounded error, model still runs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.compression import (
    dequantize_params,
    magnitude_prune,
    prune_2_4,
    quantize_int8,
    quantize_params,
    sparsity_of,
)
from lm_jax.configs import llama_style
from lm_jax.nn import Transformer

CFG = llama_style(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=16)


@pytest.fixture(scope="module")
def params():
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(Transformer(CFG).init(jax.random.key(0), tokens)["params"])


def test_magnitude_prune_hits_the_sparsity_per_layer_and_keeps_the_largest(params):
    pruned = magnitude_prune(params, 0.5)
    assert sparsity_of(pruned) == pytest.approx(0.5, abs=1e-3)
    w = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"][0])
    p = np.asarray(pruned["layers"]["mlp"]["up_proj"]["kernel"][0])
    assert np.abs(w[p == 0]).max() <= np.abs(w[p != 0]).min()
    assert (pruned["embed_tokens"]["embedding"] == params["embed_tokens"]["embedding"]).all()


def test_2_4_pruning_keeps_two_largest_of_every_four(params):
    pruned = prune_2_4(params)
    k = np.asarray(pruned["layers"]["attn"]["q_proj"]["kernel"][1])  # [D_in, D_out]
    w = np.asarray(params["layers"]["attn"]["q_proj"]["kernel"][1])
    groups = k.T.reshape(k.shape[1], -1, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    wg = np.abs(w.T.reshape(w.shape[1], -1, 4))
    kept = np.sort(np.where(groups != 0, wg, 0), -1)[..., 2:]
    np.testing.assert_array_equal(kept, np.sort(wg, -1)[..., 2:])


def test_int8_roundtrip_error_is_bounded_by_half_a_step(params):
    w = params["layers"]["mlp"]["down_proj"]["kernel"]
    q, scale = quantize_int8(w)
    assert q.dtype == jnp.int8
    err = jnp.abs(q.astype(jnp.float32) * scale - w)
    assert bool(jnp.all(err <= scale / 2 + 1e-7))
    deq = dequantize_params(quantize_params(params))
    tokens = jnp.arange(16)[None] % 64
    a = Transformer(CFG).apply({"params": params}, tokens)
    b = Transformer(CFG).apply({"params": deq}, tokens)
    assert float(jnp.max(jnp.abs(a - b))) < 0.05


def test_a_pattern_matching_nothing_is_an_error(params):
    with pytest.raises(ValueError, match="matches no parameter"):
        magnitude_prune(params, 0.5, pattern="nonexistent")
