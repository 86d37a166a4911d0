"""Prefill (lm_jax/prefill.py): the logits at each row's last prompt position equal those of a
full forward pass without a cache, for every model family and any window size (whole prompt,
windows that divide it, ragged last window, a window longer than the prompt); the cache it
writes equals the unchunked one; generate, beam search and speculative decoding give the same
tokens whatever the window; a negative window is an error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_transformer import CONFIGS, _init

from lm_jax.beam_search import beam_search
from lm_jax.generate import generate
from lm_jax.nn import Transformer, init_cache
from lm_jax.prefill import check_chunk, prefill, window_starts
from lm_jax.speculative import SpeculativeConfig, layer_draft, speculative_generate

LENGTHS = np.array([13, 5, 16, 1], np.int32)  # ragged rows, right-padded to T = 16


def test_window_starts_cover_the_prompt_with_equal_windows():
    assert window_starts(16, 0).tolist() == [0]
    assert window_starts(16, 16).tolist() == [0]
    assert window_starts(5, 8).tolist() == [0]
    assert window_starts(16, 4).tolist() == [0, 4, 8, 12]
    assert window_starts(16, 5).tolist() == [0, 5, 10, 11]  # the last one overlaps
    for T, C in [(17, 3), (100, 7), (64, 64), (9, 2)]:
        s = window_starts(T, C)
        covered = np.zeros(T, bool)
        for a in s:
            covered[a : a + C] = True
        assert covered.all() and s.max() + C == T and (np.diff(s) <= C).all()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_last_logits_and_cache_equal_a_full_forward(name):
    cfg = CONFIGS[name]
    tokens, params = _init(cfg, T=16, B=4)
    model = Transformer(cfg)
    full = model.apply({"params": params}, tokens)  # [B, T, V], no cache
    want = np.asarray(full)[np.arange(4), LENGTHS - 1]

    run = jax.jit(lambda p, t, c, chunk: prefill(model, p, t, c, jnp.asarray(LENGTHS) - 1,
                                                 chunk=chunk), static_argnums=3)  # fmt: skip
    caches = {}
    for chunk in (0, 5, 4) if name == "llama_gqa" else (0, 5):  # 5: a ragged last window
        logits, cache = run(params, tokens, init_cache(cfg, 4, 32), chunk)
        assert logits.shape == (4, cfg.vocab_size) and logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5, err_msg=name)
        caches[chunk] = cache
    for chunk, cache in caches.items():  # the same keys/values at every written position
        for a, b in zip(cache, caches[0]):
            got, ref = np.asarray(a)[:, :, :16], np.asarray(b)[:, :, :16]
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"chunk {chunk}")


def test_generate_is_the_same_whatever_the_window():
    cfg = CONFIGS["mistral_window"]  # window 5: the chunks cross the sliding window
    _, params = _init(cfg)
    prompts = [[5, 17, 3, 9, 9, 1, 40, 2, 8, 13, 70], [8, 1], [60, 4, 4, 4, 4, 4, 12]]
    ref = generate(cfg, params, prompts, jax.random.key(0), 6, temperature=0.0, prefill_chunk=0)
    for chunk in (1, 3):
        out = generate(cfg, params, prompts, jax.random.key(0), 6, temperature=0.0,
                       prefill_chunk=chunk)  # fmt: skip
        assert np.asarray(out.tokens).tolist() == np.asarray(ref.tokens).tolist(), chunk
        np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_beam_search_and_speculative_decoding_are_the_same_whatever_the_window():
    """Both prefill their caches (target and draft) through `prefill`: windows of 3 tokens give
    the unchunked beams and scores, and the unchunked greedy speculative tokens."""
    cfg = CONFIGS["mistral_window"]
    _, params = _init(cfg)
    prompts = [[5, 17, 3, 9, 9, 1, 40, 2, 8, 13, 70], [8, 1]]
    ref, got = (beam_search(cfg, params, prompts, 5, num_beams=3, prefill_chunk=c) for c in (0, 3))
    assert np.asarray(got.tokens).tolist() == np.asarray(ref.tokens).tolist()
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
    dcfg, dparams = layer_draft(cfg, params, 1)
    spec = SpeculativeConfig(lookahead=2)
    ref, got = (
        speculative_generate(cfg, params, prompts, jax.random.key(0), 6, spec, dcfg, dparams,
                             temperature=0.0, prefill_chunk=c).output
        for c in (0, 3)
    )  # fmt: skip
    assert np.asarray(got.tokens).tolist() == np.asarray(ref.tokens).tolist()
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_a_negative_chunk_is_an_error():
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        check_chunk(-1)
    cfg = CONFIGS["mistral_window"]
    _, params = _init(cfg)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        generate(cfg, params, [[1, 2]], jax.random.key(0), 2, prefill_chunk=-4)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        beam_search(cfg, params, [[1, 2]], 2, prefill_chunk=-1)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):  # called directly
        prefill(Transformer(cfg), params, jnp.ones((1, 4), jnp.int32), init_cache(cfg, 1, 8),
                jnp.zeros((1,), jnp.int32), chunk=-2)  # fmt: skip
