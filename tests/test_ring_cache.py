"""Ring-buffer KV cache for sliding-window models (Mistral): window + (tokens per call) - 1
slots instead of the full length. One token at a time through a ring of exactly `window` slots
gives the full forward's logits; `generate` (ragged prompts, prefilled whole or in windows,
greedy and sampled) and the serving engine give the full-length cache's tokens and log-probs;
mixed local / global models keep the full cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import llama_style
from lm_jax.generate import cache_for, generate
from lm_jax.nn import Transformer
from lm_jax.nn.attention import LayerCache, RingCache
from lm_jax.nn.transformer import init_cache, ring_cache_len
from lm_jax.serving.engine import Engine, EngineConfig, Request

W = 5
CFG = llama_style(vocab_size=97, d_model=32, num_heads=4, num_kv_heads=1, num_layers=2,
                  max_len=256, mlp_dim=48, sliding_window=W, initializer_range=0.3)  # fmt: skip
STOP = 3


def _params(cfg=CFG, seed=1):
    x = jnp.zeros((1, 4), jnp.int32)
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), x)["params"])


def test_one_token_at_a_time_through_a_ring_of_window_slots_equals_the_full_forward():
    params = _params()
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 97)
    full = Transformer(CFG).apply({"params": params}, tokens)  # [2, 40, V], no cache
    cache = init_cache(CFG, 2, ring_cache_len(CFG, 1), ring=True)
    assert isinstance(cache, RingCache) and cache.k.shape[2] == W
    step = jax.jit(lambda c, t, p: Transformer(CFG).apply({"params": params}, t, p, cache=c))
    for i in range(40):
        pos = jnp.full((2, 1), i, jnp.int32)
        logits, cache = step(cache, tokens[:, i : i + 1], pos)
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 8, 3])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_the_ring_equals_the_full_cache(chunk, temperature):
    params = _params()
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(4, 97, n)] for n in (3, 40, 17, 1)]
    kw = dict(prefill_chunk=chunk, stop_tokens=(STOP,))
    ring = generate(CFG, params, prompts, jax.random.key(2), 60, temperature, **kw)
    full = generate(CFG, params, prompts, jax.random.key(2), 60, temperature, ring_cache=False,
                    **kw)  # fmt: skip
    np.testing.assert_array_equal(ring.tokens, full.tokens)
    np.testing.assert_array_equal(ring.lengths, full.lengths)
    np.testing.assert_allclose(ring.logprobs, full.logprobs, atol=2e-5)
    # the ring was used: window + tokens per call - 1 slots against the full 128
    per_call = {0: 48, 8: 8, 3: 3}[chunk]
    c = cache_for(CFG, 4, 128, per_call, ring=True)
    assert isinstance(c, RingCache) and c.k.shape[2] == W + per_call - 1 < 128


def test_engine_with_a_ring_equals_generate_alone():
    params = _params()
    rng = np.random.default_rng(1)
    reqs = [Request([int(t) for t in rng.integers(4, 97, int(rng.integers(1, 40)))],
                    max_tokens=int(rng.integers(10, 50)), temperature=0.0, stop_tokens=(STOP,))
            for _ in range(7)]  # fmt: skip
    eng = Engine(CFG, params, EngineConfig(slots=3, max_len=128, decode_steps=3, prefill_chunk=8))
    outs = eng.run(reqs)
    assert isinstance(eng._state.cache, RingCache) and eng._state.cache.k.shape[2] == W + 8 - 1
    longest = max(r.max_tokens for r in reqs)
    g = generate(CFG, params, [r.prompt for r in reqs], jax.random.key(0), longest, 0.0,
                 stop_tokens=(STOP,), ring_cache=False)  # fmt: skip
    for b, (r, o) in enumerate(zip(reqs, outs)):
        n = min(int(g.lengths[b]), r.max_tokens)
        assert o.tokens == np.asarray(g.tokens[b, :n]).tolist()
        np.testing.assert_allclose(o.logprobs, np.asarray(g.logprobs[b, :n]), atol=2e-5)


def test_mixed_local_global_models_keep_the_full_cache():
    mixed = CFG.replace(layer_types=("local", "global"))
    assert ring_cache_len(mixed, 8) is None
    assert ring_cache_len(CFG.replace(sliding_window=None), 1) is None
    assert isinstance(cache_for(mixed, 2, 128, 8, ring=True), LayerCache)
    with pytest.raises(ValueError, match="needs every layer sliding-window"):
        init_cache(mixed, 2, 16, ring=True)
