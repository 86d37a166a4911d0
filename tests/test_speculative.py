"""Speculative decoding is exact: greedy output equals `generate`'s greedy output token for token
(draft model, layer self-draft, prompt lookup; ragged prompts, stop tokens), and sampled output
follows the target's sampling distribution (chi-square against the closed form from full
forwards, with a draft that disagrees with the target, and with truncation); a draft equal to the
target is always accepted; bad settings are named."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lm_jax.configs import gpt2_style, llama_style
from lm_jax.generate import generate
from lm_jax.nn import Transformer
from lm_jax.sampling import sampling_logprobs
from lm_jax.speculative import (
    SpeculativeConfig,
    layer_draft,
    ngram_proposals,
    speculative_generate,
)

TARGET = llama_style(
    vocab_size=61, d_model=32, num_heads=4, num_kv_heads=2, num_layers=3, max_len=128,
    mlp_dim=48, tie_embeddings=False, initializer_range=0.3,
)  # fmt: skip
DRAFT = llama_style(
    vocab_size=61, d_model=16, num_heads=2, num_kv_heads=1, num_layers=1, max_len=128,
    mlp_dim=24, initializer_range=0.3,
)  # fmt: skip
GPT2 = gpt2_style(vocab_size=61, d_model=32, num_heads=4, num_layers=2, max_len=96,
                  initializer_range=0.3)  # fmt: skip
STOP = 3


def _params(cfg, seed):
    init = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return nn.unbox(init["params"])


def _prompts(n, seed=0, repeat=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = [int(t) for t in rng.integers(4, 61, int(rng.integers(2, 20)))]
        out.append(p * 3 if repeat else p)  # repeated text: prompt lookup finds matches
    return out


DRAFTS = {
    "draft_model": lambda cfg, params: (SpeculativeConfig(3, "draft"), DRAFT, _params(DRAFT, 7)),
    "layer_draft": lambda cfg, params: (
        (SpeculativeConfig(2, "draft"),) + layer_draft(cfg, params, 1)
    ),
    "ngram": lambda cfg, params: (SpeculativeConfig(4, "ngram", 3), None, None),
}


@pytest.mark.parametrize("how", sorted(DRAFTS))
@pytest.mark.parametrize("cfg", [TARGET, GPT2], ids=["llama_gqa", "gpt2"])
def test_greedy_equals_plain_greedy(cfg, how):
    params = _params(cfg, 1)
    spec, dcfg, dparams = DRAFTS[how](cfg, params)
    prompts = _prompts(6, seed=2, repeat=how == "ngram")
    ref = generate(cfg, params, prompts, jax.random.key(0), 24, 0.0, stop_tokens=(STOP,))
    out = speculative_generate(
        cfg, params, prompts, jax.random.key(0), 24, spec, dcfg, dparams, temperature=0.0,
        stop_tokens=(STOP,),
    )  # fmt: skip
    np.testing.assert_array_equal(out.output.tokens, ref.tokens)
    np.testing.assert_array_equal(out.output.lengths, ref.lengths)
    np.testing.assert_array_equal(out.output.done, ref.done)
    np.testing.assert_allclose(out.output.logprobs, ref.logprobs, atol=2e-5)
    assert len(set(np.asarray(ref.tokens).ravel().tolist())) > 8  # not a degenerate model
    assert int(out.accepted.sum()) > 0
    # a round emits its accepted drafts and one more token (fewer when a stop or the end cuts it)
    assert int(out.rounds.sum()) + int(out.accepted.sum()) >= int(ref.lengths.sum()) - 6
    assert int(out.rounds.sum()) < int(ref.lengths.sum()) - 6


def test_a_draft_equal_to_the_target_is_always_accepted():
    params = _params(TARGET, 1)
    spec = SpeculativeConfig(lookahead=3, method="draft")
    out = speculative_generate(TARGET, params, _prompts(4), jax.random.key(3), 33, spec,
                               TARGET, params, temperature=1.0)  # fmt: skip
    assert out.acceptance > 0.999
    assert out.tokens_per_round == 33 / 8  # the first token from the prefill, then 8 rounds of 4


def _exact_probs(cfg, params, prompt, temperature, top_k, top_p):
    """Closed form from full forwards under the sampling distribution: p1 [V] = p_s(x1),
    p2 [V, V] = p_s(x2 | x1), p3 [V, V, V] = p_s(x3 | x1, x2)."""
    V, T = cfg.vocab_size, len(prompt)
    grid = np.array([prompt + [a, b] for a in range(V) for b in range(V)], np.int32)
    logits = Transformer(cfg).apply({"params": params}, jnp.asarray(grid))  # [V*V, T+2, V]
    s = lambda lg: np.exp(np.asarray(sampling_logprobs(lg, temperature, top_k, top_p)))
    p1 = s(logits[0, T - 1])
    p2 = s(logits[::V, T])
    p3 = s(logits[:, T + 1]).reshape(V, V, V)
    return p1, p2, p3


SAMPLING = {
    "t1": (1.0, 0, 1.0),
    "t07_topk5": (0.7, 5, 1.0),
    "topp08": (1.0, 0, 0.8),
}


@pytest.mark.parametrize(
    "how, setting", [("draft_model", "t1"), ("draft_model", "t07_topk5"), ("ngram", "topp08")]
)
def test_sampled_tokens_follow_the_target_distribution(how, setting):
    V = 7
    tcfg = llama_style(vocab_size=V, d_model=16, num_heads=2, num_kv_heads=1, num_layers=2,
                       max_len=64, mlp_dim=24, initializer_range=0.6)  # fmt: skip
    dcfg = llama_style(vocab_size=V, d_model=8, num_heads=1, num_kv_heads=1, num_layers=1,
                       max_len=64, mlp_dim=8, initializer_range=0.6)  # fmt: skip
    params, dparams = _params(tcfg, 11), _params(dcfg, 12)
    temperature, top_k, top_p = SAMPLING[setting]
    prompt = [1, 4, 2, 1, 4]  # repeats: prompt lookup proposes "2" after "1 4"
    n = 8000
    spec = SpeculativeConfig(lookahead=2, method="draft" if how == "draft_model" else "ngram")
    out = speculative_generate(
        tcfg, params, [prompt] * n, jax.random.key(5), 3, spec, dcfg, dparams,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )  # fmt: skip
    toks = np.asarray(out.output.tokens)
    p1, p2, p3 = _exact_probs(tcfg, params, prompt, temperature, top_k, top_p)
    # tokens 2 and 3 come from speculative rounds (accepted drafts, residual draws, bonus tokens)
    joint = np.einsum("a,ab,abc->bc", p1, p2, p3)
    counts = np.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V)
    expected = joint.ravel().astype(np.float64) * n
    assert counts[expected == 0].sum() == 0  # nothing outside the kept set
    keep = expected >= 5  # rarer cells are pooled into one
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
    # the draft disagrees with the target often enough for rejections to matter
    assert 0.05 < out.acceptance < 0.95
    # sample_logprobs are log p_s(token) under the target's sampling distribution
    np.testing.assert_allclose(
        np.asarray(out.output.sample_logprobs[:, 1]), np.log(p2[toks[:, 0], toks[:, 1]]), atol=1e-4
    )


def test_ngram_proposals_continue_the_latest_match():
    def check(seq, pos, k, n, want, found=True):
        got, hit = ngram_proposals(jnp.array([seq]), jnp.array([pos]), k, n)
        np.testing.assert_array_equal(got, [want])
        assert bool(hit[0]) is found

    # known up to pos 8 ("... 5 6"): the latest earlier "5 6" is at 4 -> continues 9, 5, 6
    check([5, 6, 7, 8, 5, 6, 9, 5, 6, 0, 0, 0], 8, 3, 2, [9, 5, 6])
    # suffix "1 2 3" (pos 10) matches at 0 -> 4, 9; the 2-gram "2 3" alone would give 7, 1
    seq3 = [1, 2, 3, 4, 9, 2, 3, 7, 1, 2, 3, 0]
    check(seq3, 10, 2, 3, [4, 9])
    check(seq3, 10, 2, 2, [7, 1])
    # no match: the last token repeated, not found; reads never pass the frontier
    check([1, 2, 3, 4, 0, 0], 3, 2, 2, [4, 4], found=False)
    check([1, 2, 1, 0, 0, 0], 2, 3, 1, [2, 1, 1])  # "1" at 0 -> "2, 1", then the frontier


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spec": SpeculativeConfig(method="tree")}, "method must be one of"),
        ({"spec": SpeculativeConfig(lookahead=0)}, "lookahead must be in"),
        ({"spec": SpeculativeConfig(method="ngram", max_ngram=0)}, "max_ngram must be in"),
        ({"spec": SpeculativeConfig(method="draft")}, "needs draft_config and draft_params"),
        ({"draft_config": dataclasses.replace(DRAFT, vocab_size=99)}, "vocab_size 99 differs"),
        ({"temperature": -1.0, "spec": SpeculativeConfig(method="ngram")}, "temperature"),
        ({"max_new_tokens": 200, "spec": SpeculativeConfig(method="ngram")}, "max_new_tokens"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    params = _params(TARGET, 1)
    kw = {"max_new_tokens": 4, "spec": SpeculativeConfig(method="draft")} | kwargs
    if "draft_config" in kw:
        kw["draft_params"] = params
    with pytest.raises(ValueError, match=match):
        speculative_generate(TARGET, params, [[1, 2]], jax.random.key(0), **kw)


def test_layer_draft_slices_the_target():
    params = _params(TARGET, 1)
    cfg, sliced = layer_draft(TARGET, params, 2)
    assert cfg.num_layers == 2
    leaves = jax.tree.leaves(sliced["layers"])
    assert all(x.shape[0] == 2 for x in leaves)
    with pytest.raises(ValueError, match="1 <= num_layers < the target's 3"):
        layer_draft(TARGET, params, 3)


def test_prompt_lookup_without_a_match_takes_plain_steps():
    """Rounds where no row has a match are one-token steps; sampled one row at a time (so whole
    rounds skip the window), tokens 1-2 still follow the target's sampling distribution."""
    V = 7
    cfg = llama_style(vocab_size=V, d_model=16, num_heads=2, num_kv_heads=1, num_layers=2,
                      max_len=32, mlp_dim=24, initializer_range=0.6)  # fmt: skip
    params = _params(cfg, 11)
    prompt = [1, 4, 2]
    spec = SpeculativeConfig(lookahead=2, method="ngram", max_ngram=2)
    n, toks, skipped = 600, [], 0
    for i in range(n):
        out = speculative_generate(cfg, params, [prompt], jax.random.key(i), 3, spec,
                                   temperature=1.0)  # fmt: skip
        toks.append(np.asarray(out.output.tokens[0]))
        skipped += int(out.rounds[0]) * spec.lookahead - int(out.proposed[0])
    toks = np.stack(toks)
    assert skipped > n // 4  # the first sampled token is new to the prompt often
    p1, p2, _ = _exact_probs(cfg, params, prompt, 1.0, 0, 1.0)
    expected = (p1[:, None] * p2).ravel().astype(np.float64) * n
    counts = np.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
    # greedy with nothing to copy: equal to plain greedy, through a plain step
    ref = generate(cfg, params, [prompt], jax.random.key(0), 3, 0.0)
    got = speculative_generate(cfg, params, [prompt], jax.random.key(0), 3, spec, temperature=0.0)
    np.testing.assert_array_equal(got.output.tokens, ref.tokens)
    np.testing.assert_allclose(got.output.logprobs, ref.logprobs, atol=2e-5)
    assert int(got.proposed[0]) < spec.lookahead * int(got.rounds[0]), np.asarray(ref.tokens)
