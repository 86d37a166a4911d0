"""Request scoring (lm_jax.eval.loglikelihood): multiple-choice pairs that share a context,
scored once per context over its KV cache, equal each pair scored alone by a plain forward
pass and log_softmax, for every architecture switch that touches attention or positions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_transformer import CONFIGS

from lm_jax.configs import MoEConfig
from lm_jax.eval import loglikelihood as ll_lib
from lm_jax.nn import Transformer
from lm_jax.scoring import EvalError, Scorer
from lm_jax.sharding import make_mesh


def _params(cfg):
    p = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return nn.unbox(p)


def _pairs(V: int, seed: int = 0):
    """Documents of 1-6 choices, contexts of 1-30 tokens (1: only a BOS), one document of
    20 choices (wider than one call's rows), one pair past max_len and lone pairs."""
    rng = np.random.default_rng(seed)
    pairs = []
    for n_choices in (2, 3, 1, 4, 2, 6, 20, 2, 1, 3):
        ctx = list(rng.integers(1, V, rng.integers(1, 31)))
        for _ in range(n_choices):
            pairs.append((ctx, list(rng.integers(1, V, rng.integers(1, 9)))))
    long_ctx = list(rng.integers(1, V, 70))  # 70 + 3 > max_len 64 + 1: truncated, scored whole
    pairs += [(long_ctx, [5, 6, 7]), (long_ctx, [8])]
    return pairs


def _reference(cfg, params, pairs, max_len):
    """log p(cont | ctx) and is_greedy from a plain forward pass over each whole pair (right
    padding to max_len cannot reach earlier positions of a causal model)."""
    seqs = [np.asarray((list(c) + list(x))[-(max_len + 1) :], np.int32) for c, x in pairs]
    batch = np.zeros((len(seqs), max_len), np.int32)
    for i, s in enumerate(seqs):
        batch[i, : len(s) - 1] = s[:-1]
    logits = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, batch)
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
    out = []
    for i, ((_, cont), s) in enumerate(zip(pairs, seqs, strict=True)):
        n, end = min(len(cont), len(s) - 1), len(s) - 1
        rows, tgt = lp[i, end - n : end], s[end - n + 1 :]
        out.append((rows[np.arange(n), tgt].sum(), bool((rows.argmax(-1) == tgt).all())))
    return out


def _with_greedy_choices(cfg, params, pairs):
    """Each document's first context also gets its greedy next token as a choice."""
    firsts = list({tuple(c): c for c, _ in pairs}.values())
    batch = np.zeros((len(firsts), cfg.max_len), np.int32)
    for i, c in enumerate(firsts):
        batch[i, : len(c)] = c[-cfg.max_len :]
    logits = Transformer(cfg).apply({"params": params}, batch)
    last = [min(len(c), cfg.max_len) - 1 for c in firsts]
    best = np.asarray(logits)[np.arange(len(firsts)), last].argmax(-1)
    return pairs + [(c, [int(b)]) for c, b in zip(firsts, best, strict=True)]


SWITCHES = {
    "learned_positions": CONFIGS["gpt2"],
    "sliding_window": CONFIGS["mistral_window"],
    "gemma3_local_global": CONFIGS["gemma3_mixed"],
    "gemma2_softcaps": CONFIGS["gemma2_softcap"],
    "dropless_moe": CONFIGS["qwen2_moe_mixed"],
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_shared_contexts_equal_each_pair_alone(name):
    cfg = SWITCHES[name]
    params = _params(cfg)
    pairs = _with_greedy_choices(cfg, params, _pairs(cfg.vocab_size))
    scorer = Scorer(cfg, params)
    assert scorer.shares_contexts
    want = _reference(cfg, params, pairs, cfg.max_len)
    for share in (True, False) if name == "learned_positions" else (True,):  # whole: once
        got = ll_lib.score_token_pairs(scorer, cfg.max_len, pairs, 3, share_contexts=share)
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=2e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
    assert 0 < sum(w[1] for w in want) < len(want)  # the greedy flag is tested both ways


def test_calls_past_the_token_budget_take_fewer_rows(monkeypatch):
    """A call whose rows x positions pass SHARED_CALL_TOKENS is split into narrower calls (the
    BIG-bench hhh_alignment documents on SmolLM2: 128 rows x 1,920 positions asked for 39 GB);
    the scores stay those of each pair alone."""
    cfg = CONFIGS["gpt2"]
    params, pairs = _params(cfg), _pairs(cfg.vocab_size, seed=2)
    want = _reference(cfg, params, pairs, cfg.max_len)
    scorer = Scorer(cfg, params)
    shapes = []
    real = scorer.score_after_context
    spy = lambda c, o, r: shapes.append(r["inputs"].shape) or real(c, o, r)  # noqa: E731
    monkeypatch.setattr(scorer, "score_after_context", spy)
    monkeypatch.setattr(ll_lib, "SHARED_CALL_TOKENS", 64)
    got = ll_lib.score_token_pairs(scorer, cfg.max_len, pairs, 4)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=2e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert shapes and all(n * t <= 64 or n == 1 for n, t in shapes)


def test_shared_contexts_sharded_equal_single_device():
    cfg = CONFIGS["llama_gqa"]
    params, pairs = _params(cfg), _pairs(cfg.vocab_size, seed=1)
    want = ll_lib.score_token_pairs(Scorer(cfg, params), cfg.max_len, pairs, batch_size=3)
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    got = ll_lib.score_token_pairs(Scorer(cfg, params, mesh), cfg.max_len, pairs, batch_size=3)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_capacity_moe_is_scored_whole_and_bad_calls_are_clear_errors():
    cfg = CONFIGS["llama_gqa"].replace(moe=MoEConfig(num_experts=4, top_k=2, dispatch="capacity"))
    params = _params(cfg)
    scorer = Scorer(cfg, params)
    assert not scorer.shares_contexts  # routing groups a call's tokens: shared calls would differ
    pairs = _pairs(cfg.vocab_size)[:5]
    want = _reference(cfg, params, pairs, cfg.max_len)
    got = ll_lib.score_token_pairs(scorer, cfg.max_len, pairs, batch_size=8)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=2e-4)
    rows = {k: np.zeros((2, 4), np.int32) for k in ("inputs", "targets", "positions")}
    with pytest.raises(EvalError, match="dense or dropless"):
        scorer.score_after_context(np.zeros((1, 8), np.int32), np.zeros(2, np.int32), rows)
    dense = Scorer(CONFIGS["llama_gqa"], _params(CONFIGS["llama_gqa"]))
    with pytest.raises(EvalError, match="exceed the model's max_len 64"):
        dense.score_after_context(np.zeros((1, 62), np.int32), np.zeros(2, np.int32), rows)
    with pytest.raises(EvalError, match="owner must be"):
        dense.score_after_context(np.zeros((1, 8), np.int32), np.array([0, 1]), rows)
    with pytest.raises(EvalError, match="continuation is empty"):
        ll_lib.score_token_pairs(dense, 64, [([1, 2], [])])


def test_length_ladder_is_geometric_and_bounds_padding():
    from lm_jax.utils import length_bucket

    got = [length_bucket(n) for n in (1, 16, 17, 33, 129, 200, 257)]
    assert got == [16, 16, 20, 40, 160, 224, 320]
    assert [length_bucket(n, 1, 1) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    for n in range(17, 2000):
        b = length_bucket(n)
        assert n <= b < 1.25 * n + 1  # four steps an octave: under 25% padding
    assert len({length_bucket(n) for n in range(1, 4097)}) == 1 + 4 * 8  # O(log) shapes
