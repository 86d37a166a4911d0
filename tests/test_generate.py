"""KV-cache generation: greedy = argmax of full forwards, ragged batches, sampling distributions
(chi-square), stop tokens, determinism, sharded = single device, scoring, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lm_jax.configs import MoEConfig, gpt2_style, llama_style
from lm_jax.generate import generate, sample_logits, sampling_logprobs
from lm_jax.nn import Transformer
from lm_jax.sequence_scoring import continuation_logprobs, sequence_logprobs
from lm_jax.sharding import make_mesh, params_shardings

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
        vocab_size=97, d_model=32, num_heads=4, num_kv_heads=1, num_layers=2, sliding_window=5
    ),
}
PROMPTS = [[5, 17, 3], [8, 1, 44, 90, 12, 7, 7], [60], [2, 2, 9, 31, 50]]


def _params(cfg, seed=1):
    init = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return nn.unbox(init["params"])


def _greedy_reference(cfg, params, prompts, n, width=32):
    """Step-by-step argmax of full forwards (no cache), and log_softmax at those positions.

    Each step runs the whole sequences (right-padded to `width`; causal, so padding after a
    row's last token cannot change its logits) and reads the logits at the last token.
    """
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    seqs = [list(p) for p in prompts]
    toks, lps = [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(n):
        arr = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            arr[b, : len(s)] = s
        logits = np.asarray(fwd(params, jnp.asarray(arr)))
        for b, s in enumerate(seqs):
            last = logits[b, len(s) - 1]
            tok = int(np.argmax(last))
            lps[b].append(float(jax.nn.log_softmax(jnp.asarray(last))[tok]))
            toks[b].append(tok)
            s.append(tok)
    return toks, lps


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_argmax_of_full_forwards(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    n = 9
    out = generate(cfg, params, PROMPTS, jax.random.key(0), n, temperature=0.0)
    assert out.tokens.shape == (len(PROMPTS), n) and out.tokens.dtype == jnp.int32
    toks, lps = _greedy_reference(cfg, params, PROMPTS, n)
    np.testing.assert_array_equal(out.tokens, toks)
    np.testing.assert_allclose(out.logprobs, lps, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.sample_logprobs, 0.0)  # greedy: q(token) = 1
    np.testing.assert_array_equal(out.lengths, n)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_ragged_batch_equals_each_prompt_alone(name):
    cfg = CONFIGS[name]
    params = _params(cfg, seed=2)
    key = jax.random.key(3)
    batch = generate(cfg, params, PROMPTS, key, 8, temperature=0.0)
    # The same batch as a right-padded array with garbage in the pad slots.
    T = max(map(len, PROMPTS))
    arr = np.full((len(PROMPTS), T), -1, np.int32)
    for b, p in enumerate(PROMPTS):
        arr[b, : len(p)] = p
    lens = [len(p) for p in PROMPTS]
    as_array = generate(cfg, params, arr, key, 8, temperature=0.0, prompt_lengths=lens)
    np.testing.assert_array_equal(as_array.tokens, batch.tokens)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(cfg, params, [prompt], key, 8, temperature=0.0)
        np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(batch.logprobs[b], alone.logprobs[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- sampling


def _reference_distribution(logits, temperature, top_k=0, top_p=1.0):
    """Numpy: softmax(logits / T) restricted to the top_k, then the nucleus, renormalised."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, top_p)) + 1  # smallest prefix with mass >= top_p
        keep = np.zeros_like(p, bool)
        keep[order[:n]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def _chisquare(samples, expected, n):
    counts = np.bincount(np.asarray(samples).reshape(-1), minlength=len(expected))
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside the kept set"
    assert (expected[support] * n >= 5).all()  # chi-square validity
    return stats.chisquare(counts[support], expected[support] * n).pvalue


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.5, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.8, top_k=4, top_p=0.75),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_sample_logits_matches_target_distribution(setting):
    logits = np.array([2.0, 1.2, 0.9, 0.1, -0.5, -1.0], np.float32)
    n = 20000
    out = sample_logits(
        jnp.broadcast_to(jnp.asarray(logits), (n, 6)), jax.random.key(11), **setting
    )
    expected = _reference_distribution(logits, **setting)
    assert _chisquare(out.tokens, expected, n) > 0.001
    # log-probs: model (T=1, no truncation) and the sampling distribution.
    base = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    np.testing.assert_allclose(out.logprobs, base[out.tokens], atol=1e-5)
    np.testing.assert_allclose(
        out.sample_logprobs, np.log(np.maximum(expected, 1e-30))[out.tokens], atol=1e-5
    )
    q = sampling_logprobs(jnp.asarray(logits), **setting)
    np.testing.assert_allclose(np.exp(q), expected, atol=1e-6)


def test_top_p_keeps_top_token_and_greedy_is_argmax():
    logits = jnp.array([[0.0, 3.0, 1.0], [5.0, 4.9, -2.0]])
    out = sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(out.tokens, [1, 0])
    np.testing.assert_allclose(out.sample_logprobs, 0.0, atol=1e-6)
    out = sample_logits(logits, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(out.tokens, [1, 0])


GEN_SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.0, top_p=0.6),
]


@pytest.mark.parametrize("setting", GEN_SETTINGS, ids=str)
def test_generate_samples_the_model_distribution(setting):
    """Pairs (x1, x2) from a 1-layer model follow p(x1 | prompt) p(x2 | prompt, x1) as filtered,
    with the distributions computed exactly from full forwards."""
    cfg = gpt2_style(vocab_size=8, d_model=16, num_heads=2, num_layers=1, max_len=16)
    cfg = cfg.replace(initializer_range=0.25)  # uneven, token-dependent distributions
    params = _params(cfg, seed=5)
    prompt, n = [3, 1, 4], 6000
    model = Transformer(cfg)

    def dist(seq):
        logits = model.apply({"params": params}, jnp.asarray([seq]))[0, -1]
        return _reference_distribution(np.asarray(logits), **setting)

    p1 = dist(prompt)
    joint = np.stack([p1[a] * dist(prompt + [a]) if p1[a] > 0 else np.zeros(8) for a in range(8)])
    out = generate(cfg, params, [prompt] * n, jax.random.key(7), 2, **setting)
    pairs = np.asarray(out.tokens[:, 0] * 8 + out.tokens[:, 1])
    flat = joint.reshape(-1)
    big = flat * n >= 5  # pool rare cells into one, for chi-square validity
    cells = np.where(big[pairs], pairs, 64)
    expected = np.append(np.where(big, flat, 0.0), flat[~big].sum())
    assert (expected > 0).sum() >= 3, "degenerate test model: too few cells for chi-square"
    assert _chisquare(cells, expected, n) > 0.001
    # sample_logprobs = log q of the drawn tokens; logprobs = log p at temperature 1.
    q = np.log(np.maximum(joint, 1e-30))
    np.testing.assert_allclose(
        np.asarray(out.sample_logprobs).sum(1), q.reshape(-1)[pairs], atol=1e-4
    )
    scored = continuation_logprobs(cfg, params, [prompt] * n, out.tokens, out.lengths)
    np.testing.assert_allclose(out.logprobs, scored, atol=1e-5)


# ----------------------------------------------------------------------------- control


def test_stop_tokens_and_max_new_tokens():
    cfg = CONFIGS["llama_gqa"]
    params = _params(cfg)
    n = 12
    free = generate(cfg, params, PROMPTS, jax.random.key(0), n, temperature=0.0)
    row0 = np.asarray(free.tokens[0])
    stop = int(row0[4])
    first = int(np.flatnonzero(row0 == stop)[0])
    out = generate(
        cfg, params, PROMPTS, jax.random.key(0), n, temperature=0.0, stop_tokens=[stop], pad_id=96
    )
    assert out.tokens.shape == (len(PROMPTS), n)
    for b in range(len(PROMPTS)):
        row = np.asarray(free.tokens[b])
        hits = np.flatnonzero(row == stop)
        L = int(hits[0]) + 1 if len(hits) else n
        assert int(out.lengths[b]) == L and bool(out.done[b]) == bool(len(hits))
        np.testing.assert_array_equal(out.tokens[b, :L], row[:L])
        np.testing.assert_array_equal(out.tokens[b, L:], 96)
        np.testing.assert_array_equal(out.logprobs[b, L:], 0.0)
        np.testing.assert_array_equal(out.mask[b], np.arange(n) < L)
    assert int(out.lengths[0]) == first + 1
    # Every row stops at once: early exit, all rows length 1.
    firsts = sorted({int(t) for t in free.tokens[:, 0]})
    out = generate(cfg, params, PROMPTS, jax.random.key(0), n, temperature=0, stop_tokens=firsts)
    np.testing.assert_array_equal(out.lengths, 1)
    assert bool(out.done.all()) and (np.asarray(out.tokens[:, 1:]) == 0).all()
    # max_new_tokens up to the model's max_len is fine; one more is an error (learned positions).
    g = CONFIGS["gpt2"]
    out = generate(g, _params(g), [[1] * 10], jax.random.key(0), g.max_len - 10, temperature=0)
    assert out.tokens.shape == (1, g.max_len - 10)


def test_same_key_same_output_different_key_different():
    cfg = CONFIGS["llama_gqa"]
    params = _params(cfg)
    kw = dict(temperature=1.0, top_k=20)
    a = generate(cfg, params, PROMPTS, jax.random.key(4), 10, **kw)
    b = generate(cfg, params, PROMPTS, jax.random.key(4), 10, **kw)
    c = generate(cfg, params, PROMPTS, jax.random.key(5), 10, **kw)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_sequence_logprobs_equals_log_softmax_of_forward():
    cfg = CONFIGS["gpt2"]
    params = _params(cfg)
    toks = jax.random.randint(jax.random.key(0), (3, 12), 0, cfg.vocab_size)
    lengths = np.array([12, 7, 9])
    out = sequence_logprobs(cfg, params, toks, lengths, prompt_lengths=[3, 1, 4])
    full = jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, toks), -1)
    for b, (L, P) in enumerate(zip(lengths, [3, 1, 4], strict=True)):
        ref = np.take_along_axis(np.asarray(full[b, :-1]), np.asarray(toks[b, 1:, None]), 1)[:, 0]
        want = np.where((np.arange(1, 12) < L) & (np.arange(1, 12) >= P), ref, 0.0)
        np.testing.assert_allclose(out[b, 1:], want, atol=1e-5)
        assert float(out[b, 0]) == 0.0
    # Ragged continuations as lists = the same tokens scored inside the full sequences.
    prompts = [[int(t) for t in toks[b, :P]] for b, P in enumerate([3, 1, 4])]
    conts = [[int(t) for t in toks[b, P:L]] for b, (P, L) in enumerate(zip([3, 1, 4], lengths))]
    got = continuation_logprobs(cfg, params, prompts, conts)
    for b, (P, L) in enumerate(zip([3, 1, 4], lengths, strict=True)):
        np.testing.assert_allclose(got[b, : L - P], out[b, P:L], atol=1e-5)
        np.testing.assert_array_equal(got[b, L - P :], 0.0)


# ----------------------------------------------------------------------------- sharding


@pytest.mark.slow
def test_sharded_forward_and_generate_equal_single_device():
    cfg = CONFIGS["llama_gqa"]
    params = _params(cfg)
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    abstract = jax.eval_shape(
        Transformer(cfg).init, jax.random.key(1), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    sharded = jax.device_put(params, params_shardings(abstract, mesh))
    specs = [x.sharding.spec for x in jax.tree.leaves(sharded)]
    assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
    toks = jax.random.randint(jax.random.key(2), (4, 16), 0, cfg.vocab_size)
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    ref_fwd = fwd(params, toks)
    kw = dict(stop_tokens=[5], max_new_tokens=10)
    ref_g = generate(cfg, params, PROMPTS, jax.random.key(0), temperature=0.0, **kw)
    ref_s = generate(cfg, params, PROMPTS, jax.random.key(0), top_k=10, top_p=0.9, **kw)
    ref_lp = sequence_logprobs(cfg, params, toks)
    with jax.set_mesh(mesh):
        out_fwd = fwd(sharded, toks)
        out_g = generate(cfg, sharded, PROMPTS, jax.random.key(0), temperature=0.0, **kw)
        out_s = generate(cfg, sharded, PROMPTS, jax.random.key(0), top_k=10, top_p=0.9, **kw)
        out_lp = sequence_logprobs(cfg, sharded, toks)
    np.testing.assert_allclose(out_fwd, ref_fwd, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out_lp, ref_lp, atol=1e-5, rtol=0)
    for ref, out in ((ref_g, out_g), (ref_s, out_s)):
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.sample_logprobs, ref.sample_logprobs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- prefix embeds

PREFIX_CONFIGS = {
    "gpt2": CONFIGS["gpt2"],  # learned positions cover the prefix too
    "llama_gqa": CONFIGS["llama_gqa"],
    "moe_every_2": llama_style(
        vocab_size=97,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        num_layers=2,
        max_len=64,
        mlp_dim=48,
        moe=MoEConfig(num_experts=4, top_k=2, every=2),
    ),
}


@pytest.mark.parametrize("name", sorted(PREFIX_CONFIGS))
def test_prefix_embeds_greedy_equals_full_forward_argmax(name):
    """generate(prefix_embeds=) on a ragged batch = argmax of no-cache full forwards of
    [prefix; prompt; generated so far]; log-probs too."""
    cfg = PREFIX_CONFIGS[name]
    params = _params(cfg)
    P, n, width = 5, 7, 24
    prefix = jax.random.normal(jax.random.key(3), (len(PROMPTS), P, cfg.d_model))
    out = generate(cfg, params, PROMPTS, jax.random.key(0), n, 0.0, prefix_embeds=prefix)
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, prefix_embeds=prefix))
    seqs = [list(q) for q in PROMPTS]
    for j in range(n):
        arr = np.zeros((len(seqs), width), np.int32)
        for b, q in enumerate(seqs):
            arr[b, : len(q)] = q
        logits = np.asarray(fwd(params, jnp.asarray(arr)))
        for b, q in enumerate(seqs):
            last = logits[b, P + len(q) - 1]
            q.append(int(np.argmax(last)))
            assert int(out.tokens[b, j]) == q[-1], (b, j)
            lp = float(jax.nn.log_softmax(jnp.asarray(last))[q[-1]])
            np.testing.assert_allclose(float(out.logprobs[b, j]), lp, atol=1e-5)
    # the prefix matters, and bad shapes / lengths are clear errors
    other = generate(cfg, params, PROMPTS, jax.random.key(0), n, 0.0, prefix_embeds=prefix * 0)
    assert float(jnp.max(jnp.abs(out.logprobs - other.logprobs))) > 1e-4
    with pytest.raises(ValueError, match=r"prefix_embeds must be \[B=4, P, d_model=32\]"):
        generate(cfg, params, PROMPTS, jax.random.key(0), n, prefix_embeds=prefix[:2])
    with pytest.raises(ValueError, match=r"5 prefix embeddings \+ prompt \(12 tokens\)"):
        generate(cfg, params, PROMPTS, jax.random.key(0), 60, prefix_embeds=prefix)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    cfg = CONFIGS["gpt2"]
    params = _params(cfg)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\[0, 97\).*max 97"):
        generate(cfg, params, [[1, 2, 97]], key, 4)
    with pytest.raises(ValueError, match=r"\[0, 97\).*min -1"):
        generate(cfg, params, np.array([[1, -1, 3]]), key, 4)
    with pytest.raises(ValueError, match="prompt longer than the maximum length.*70.*64"):
        generate(cfg, params, [[1] * 70], key, 4)
    with pytest.raises(ValueError, match=r"60 tokens\) \+ max_new_tokens \(10\) = 70.*64"):
        generate(cfg, params, [[1] * 60], key, 10)
    with pytest.raises(ValueError, match="empty"):
        generate(cfg, params, [[1, 2], []], key, 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(cfg, params, [[1, 2]], key, 4, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(cfg, params, [[1, 2]], key, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(cfg, params, [[1, 2]], key, 4, stop_tokens=[200])
    with pytest.raises(ValueError, match="learned positions"):
        generate(cfg, params, [[1, 2]], key, 4, max_len=128)
