"""Model invariants: KV-cache decode equals the full forward, packing isolation, bad input."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    RopeScaling,
    gpt2_style,
    llama_style,
)
from lm_jax.nn import Transformer, init_cache

# Gemma-style switches: (1 + w) norms, four norms per layer, scaled embeddings, GELU-tanh
_GEMMA = dict(
    norm_unit_offset=True, post_norms=True, embed_scale=True, activation="gelu_tanh",
    norm_eps=1e-6, initializer_range=0.1,
)  # fmt: skip

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
    # local, local, global (window 5 < T); two RoPE bases, linear scaling on the global one
    "gemma3_mixed": llama_style(
        vocab_size=97, d_model=48, num_heads=4, num_kv_heads=1, head_dim=16, num_layers=3,
        max_len=64, mlp_dim=64, sliding_window=5, layer_types=("local", "local", "global"),
        rope_theta=1e6, rope_local_theta=1e4, rope_scaling=RopeScaling(4.0, rope_type="linear"),
        qk_norm=True, query_pre_attn_scalar=24.0, tie_embeddings=False, **_GEMMA,
    ),
    # alternating local / global with both soft caps
    "gemma2_softcap": llama_style(
        vocab_size=97, d_model=32, num_heads=4, num_kv_heads=2, head_dim=12, num_layers=2,
        max_len=64, mlp_dim=48, sliding_window=5, layer_types=("local", "global"),
        attn_softcap=1.5, final_softcap=3.0, query_pre_attn_scalar=16.0, **_GEMMA,
    ),
    # q/k/v biases, MoE every 2nd layer (scanned layer groups) with mixed local / global layers
    "qwen2_moe_mixed": llama_style(
        vocab_size=97, d_model=32, num_heads=4, num_kv_heads=2, num_layers=4, max_len=64,
        mlp_dim=48, qkv_bias=True, sliding_window=5,
        layer_types=("global", "local", "local", "global"),
        moe=MoEConfig(num_experts=4, top_k=2, every=2),
    ),
}  # fmt: skip


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
    step = jax.jit(lambda tok, pos, c: model.apply({"params": params}, tok, pos, cache=c))
    cache = init_cache(cfg, tokens.shape[0], 32)
    logits, cache = model.apply({"params": params}, tokens[:, :9], cache=cache)
    outs = [logits]
    for t in range(9, tokens.shape[1]):  # one compiled decode step
        pos = jnp.full((tokens.shape[0], 1), t)
        logits, cache = step(tokens[:, t : t + 1], pos, cache)
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


def test_mixed_layers_under_remat_and_unrolled_scan():
    """The per-layer local flag rides the scan under remat and unrolling: same loss and grads."""
    cfg = CONFIGS["gemma3_mixed"]
    tokens, params = _init(cfg, T=12)

    def loss_grads(c):
        f = lambda p: jnp.mean(Transformer(c).apply({"params": p}, tokens) ** 2)  # noqa: E731
        return jax.value_and_grad(f)(params)

    ref, got = loss_grads(cfg), loss_grads(cfg.replace(remat="full", scan_unroll=3))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)


def test_family_switch_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="each of the 2 layers"):
        llama_style(num_layers=2, sliding_window=4, layer_types=("local",))
    with pytest.raises(ConfigError, match="set sliding_window"):
        llama_style(num_layers=2, layer_types=("local", "global"))
    with pytest.raises(ConfigError, match="norm='rmsnorm'"):
        gpt2_style(norm_unit_offset=True)
    with pytest.raises(ConfigError, match="attn_softcap must be None or > 0"):
        llama_style(attn_softcap=0.0)
    with pytest.raises(ConfigError, match="rope_scaling.rope_type"):
        RopeScaling(rope_type="yarn")
    cfg = llama_style(num_layers=2, sliding_window=4, layer_types=["local", "global"])
    assert cfg.layer_types == ("local", "global") and hash(cfg)  # JSON lists become tuples
    g3 = CONFIGS["gemma3_mixed"]
    assert ModelConfig.from_dict(json.loads(json.dumps(g3.to_dict()))) == g3
