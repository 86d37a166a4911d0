"""Model invariants: KV-cache decode equals the full forward, packing isolation, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import ConfigError, gpt2_style, llama_style
from lm_jax.nn import Transformer, init_cache

CONFIGS = {
    "gpt2": gpt2_style(vocab_size=97, d_model=32, num_heads=4, num_layers=2, max_len=64),
    "llama_gqa": llama_style(
        vocab_size=97,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        num_layers=2,
        max_len=64,
        mlp_dim=48,
        tie_embeddings=False,
    ),
    "mistral_window": llama_style(
        vocab_size=97,
        d_model=32,
        num_heads=4,
        num_kv_heads=1,
        num_layers=2,
        max_len=64,
        sliding_window=5,
    ),
}


def _init(cfg, T=16, B=2, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(1), tokens)["params"])
    return tokens, params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_decode_equals_full_forward(name):
    cfg = CONFIGS[name]
    tokens, params = _init(cfg, T=20)
    model = Transformer(cfg)
    full = model.apply({"params": params}, tokens)
    cache = init_cache(cfg, tokens.shape[0], 32)
    logits, cache = model.apply({"params": params}, tokens[:, :9], cache=cache)
    outs = [logits]
    for t in range(9, tokens.shape[1]):
        pos = jnp.full((tokens.shape[0], 1), t)
        logits, cache = model.apply({"params": params}, tokens[:, t : t + 1], pos, cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_segments_do_not_attend_across_documents(name):
    cfg = CONFIGS[name]
    a = jax.random.randint(jax.random.key(3), (1, 7), 0, cfg.vocab_size)
    b = jax.random.randint(jax.random.key(4), (1, 9), 0, cfg.vocab_size)
    _, params = _init(cfg)
    model = Transformer(cfg)
    packed = jnp.concatenate([a, b], 1)
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(9)])[None]
    seg = jnp.array([[1] * 7 + [2] * 9])
    out = model.apply({"params": params}, packed, pos, seg)
    np.testing.assert_allclose(out[:, :7], model.apply({"params": params}, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], model.apply({"params": params}, b), atol=1e-5)


def test_out_of_range_token_ids_are_errors():
    cfg = CONFIGS["llama_gqa"]
    tokens, params = _init(cfg)
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        model.apply({"params": params}, tokens.at[0, 0].set(cfg.vocab_size))
    with pytest.raises(ValueError, match="pad ids"):
        model.apply({"params": params}, tokens.at[0, 0].set(-1))


def test_sequence_longer_than_max_len_is_an_error():
    cfg = CONFIGS["gpt2"]
    _, params = _init(cfg)
    with pytest.raises(ValueError, match="max_len"):
        Transformer(cfg).apply({"params": params}, jnp.zeros((1, cfg.max_len + 1), jnp.int32))


def test_heads_not_divisible_by_kv_heads_is_a_config_error():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        llama_style(num_heads=6, num_kv_heads=4)


def test_remat_and_bf16_run_and_stay_close():
    cfg = CONFIGS["llama_gqa"]
    tokens, params = _init(cfg)
    ref = Transformer(cfg).apply({"params": params}, tokens)
    for remat in ("dots", "full"):
        out = Transformer(cfg.replace(remat=remat)).apply({"params": params}, tokens)
        np.testing.assert_allclose(out, ref, atol=1e-6)
    out = Transformer(cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1
