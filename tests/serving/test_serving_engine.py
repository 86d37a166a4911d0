"""Continuous batching: outputs equal `lm_jax.generate` of each request alone (greedy tokens and
log-probs) while requests join and leave the running batch; seeded samples do not depend on
their neighbours; per-row sampling equals the closed-form sampling distribution (chi-square);
cancel, logprob alternatives, and bad requests named."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lm_jax.configs import gpt2_style, llama_style
from lm_jax.errors import ConfigError
from lm_jax.generate import generate
from lm_jax.nn import Transformer
from lm_jax.sampling import rows_sampling_logprobs, sample_rows, sampling_logprobs
from lm_jax.serving.engine import Engine, EngineConfig, Request

CONFIGS = {
    "llama_gqa": llama_style(
        vocab_size=97, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, max_len=128,
        mlp_dim=48, tie_embeddings=False, initializer_range=0.3,
    ),
    "gpt2": gpt2_style(
        vocab_size=97, d_model=32, num_heads=4, num_layers=2, max_len=128, initializer_range=0.3
    ),
    "mistral_window": llama_style(
        vocab_size=97, d_model=32, num_heads=4, num_kv_heads=1, num_layers=2, max_len=128,
        sliding_window=5, initializer_range=0.3,
    ),
}  # fmt: skip
STOP = 3


def _params(cfg, seed=1):
    init = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return nn.unbox(init["params"])


def _requests(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [
        Request(
            [int(t) for t in rng.integers(4, 97, int(rng.integers(1, 40)))],
            max_tokens=int(rng.integers(1, 30)),
            stop_tokens=(STOP,),
            **kw,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_generate_alone_while_requests_join_and_leave(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    reqs = _requests(11, temperature=0.0, logprobs=2)
    chunk = 5 if name == "gpt2" else 0  # GPT-2: prompts (16 slots) prefilled in windows of 5
    ecfg = EngineConfig(slots=3, max_len=96, decode_steps=3, top_logprobs=2, prefill_chunk=chunk)
    eng = Engine(cfg, params, ecfg)
    outs = eng.run(reqs)
    # 11 requests through 3 slots: they must have joined a running batch
    assert eng.decode_dispatches < sum(len(o.tokens) for o in outs) / 3
    # each request alone = its row of one ragged greedy batch (rows are independent)
    longest = max(r.max_tokens for r in reqs)
    g = generate(cfg, params, [r.prompt for r in reqs], jax.random.key(0), longest, 0.0,
                 stop_tokens=(STOP,))  # fmt: skip
    distinct = set()
    for b, (r, o) in enumerate(zip(reqs, outs)):
        n = min(int(g.lengths[b]), r.max_tokens)
        assert o.tokens == np.asarray(g.tokens[b, :n]).tolist()
        np.testing.assert_allclose(o.logprobs, np.asarray(g.logprobs[b, :n]), atol=2e-5)
        stopped = bool(g.done[b]) and int(g.lengths[b]) <= r.max_tokens
        assert o.finish == ("stop" if stopped else "length")
        distinct.update(o.tokens)
        # the alternatives are the top-2 of the model's distribution, the first = greedy token
        assert [t[0][0] for t in o.top] == o.tokens
    assert len(distinct) > 10  # not a degenerate model that repeats one token


def test_top_alternatives_are_the_top_log_probs():
    cfg = CONFIGS["llama_gqa"]
    params = _params(cfg)
    r = Request([5, 9, 11], max_tokens=6, temperature=0.0, logprobs=3)
    eng = Engine(cfg, params, EngineConfig(slots=2, max_len=64, decode_steps=2, top_logprobs=4))
    o = eng.run([r])[0]
    seq = list(r.prompt)
    for tok, lp, top in zip(o.tokens, o.logprobs, o.top):
        logits = Transformer(cfg).apply({"params": params}, jnp.asarray([seq]))[0, -1]
        ref = np.asarray(jax.nn.log_softmax(logits))
        best = np.argsort(-ref)[:3]
        assert [i for i, _ in top] == best.tolist()
        np.testing.assert_allclose([v for _, v in top], ref[best], atol=2e-5)
        assert tok == best[0] and abs(lp - ref[tok]) < 2e-5
        seq.append(tok)


def test_seeded_samples_do_not_depend_on_the_batch():
    cfg = CONFIGS["llama_gqa"]
    params = _params(cfg)
    ecfg = EngineConfig(slots=4, max_len=96, decode_steps=2)
    mine = Request([5, 6, 7], max_tokens=24, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    alone = Engine(cfg, params, ecfg).run([mine])[0]
    crowd = _requests(6, seed=3, temperature=1.0, top_p=0.8)
    beside = Engine(cfg, params, ecfg).run(crowd[:3] + [mine] + crowd[3:])[3]
    assert beside.tokens == alone.tokens
    np.testing.assert_allclose(beside.logprobs, alone.logprobs, atol=2e-5)
    other = Engine(cfg, params, ecfg).run([Request(**{**mine.__dict__, "seed": 8})])[0]
    assert other.tokens != alone.tokens


def test_rows_sampling_equals_the_uniform_settings_closed_form():
    logits = jax.random.normal(jax.random.key(0), (6, 50)) * 3
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)]:
        ref = sampling_logprobs(logits, t, k, p)
        got = rows_sampling_logprobs(
            logits, jnp.full((6,), t), jnp.full((6,), k, jnp.int32), jnp.full((6,), p)
        )
        np.testing.assert_allclose(np.exp(got), np.exp(ref), atol=1e-6)
    # mixed rows: each row as its own settings alone
    ts, ks, ps = jnp.array([1.0, 0.7, 1.3]), jnp.array([0, 5, 0]), jnp.array([1.0, 1.0, 0.8])
    got = rows_sampling_logprobs(logits[:3], ts, ks, ps)
    for b in range(3):
        ref = sampling_logprobs(logits[b : b + 1], float(ts[b]), int(ks[b]), float(ps[b]))
        np.testing.assert_allclose(np.exp(got[b]), np.exp(ref[0]), atol=1e-6)


def test_sample_rows_follows_the_sampling_distribution_chi_square():
    V, n = 12, 4000
    logits = jax.random.normal(jax.random.key(1), (V,))
    settings = [(1.0, 0, 1.0), (0.8, 6, 1.0), (1.0, 0, 0.7)]
    keys = jax.random.split(jax.random.key(2), n)
    for t, k, p in settings:
        out = jax.jit(sample_rows)(
            jnp.broadcast_to(logits, (n, V)), keys, jnp.full((n,), t),
            jnp.full((n,), k, jnp.int32), jnp.full((n,), p),
        )  # fmt: skip
        probs = np.exp(np.asarray(sampling_logprobs(logits[None], t, k, p)[0], np.float64))
        counts = np.bincount(np.asarray(out.tokens), minlength=V)
        keep = probs > 0
        assert counts[~keep].sum() == 0  # never outside the kept set
        expected = probs[keep] / probs[keep].sum() * n
        assert stats.chisquare(counts[keep], expected).pvalue > 1e-3
        slp = np.log(probs[np.asarray(out.tokens)])
        np.testing.assert_allclose(np.asarray(out.sample_logprobs), slp, atol=1e-5)
    greedy = sample_rows(logits[None], keys[:1], jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
                         jnp.ones((1,)))  # fmt: skip
    assert (
        int(greedy.tokens[0]) == int(jnp.argmax(logits)) and float(greedy.sample_logprobs[0]) == 0
    )


def test_cancel_frees_the_slot():
    cfg = CONFIGS["gpt2"]
    params = _params(cfg)
    eng = Engine(cfg, params, EngineConfig(slots=1, max_len=64, decode_steps=2))
    a = eng.add(Request([5, 6], max_tokens=40, temperature=0.0))
    b = eng.add(Request([7, 8], max_tokens=3, temperature=0.0))
    eng.step()
    assert eng.num_running == 1 and eng.num_waiting == 1
    assert eng.cancel(a)
    events = []
    while eng.busy:
        events += eng.step()
    assert (a, "cancelled") in [(e.rid, e.finish) for e in events]
    assert [e.finish for e in events if e.rid == b][-1] == "length"
    assert len([e for e in events if e.rid == b]) == 3
    assert not eng.cancel(a)


def test_bad_requests_and_configs_are_named():
    cfg = CONFIGS["gpt2"]
    eng = Engine(cfg, _params(cfg), EngineConfig(slots=2, max_len=32, top_logprobs=2))
    cases = [
        (Request([], 4), "empty"),
        (Request([5, 200], 4), r"\[0, 97\)"),
        (Request([5] * 30, 4), "lower max_tokens to at most 2"),
        (Request([5] * 32, 4), "shorten the prompt"),
        (Request([5], 0), "max_tokens must be >= 1"),
        (Request([5], 4, temperature=-1.0), "temperature"),
        (Request([5], 4, top_p=0.0), "top_p"),
        (Request([5], 4, logprobs=3), "--engine.top_logprobs"),
        (Request([5], 4, stop_tokens=(97,)), "stop tokens"),
    ]
    for req, match in cases:
        with pytest.raises(ValueError, match=match):
            eng.add(req)
    assert not eng.busy
    with pytest.raises(ConfigError, match="--engine.max_len=200 exceeds the model's max_len 128"):
        Engine(cfg, _params(cfg), EngineConfig(max_len=200))
    with pytest.raises(ConfigError, match="--engine.slots must be >= 1"):
        Engine(cfg, _params(cfg), EngineConfig(slots=0))
    with pytest.raises(ConfigError, match="--engine.prefill_chunk must be >= 0"):
        Engine(cfg, _params(cfg), EngineConfig(prefill_chunk=-1))
