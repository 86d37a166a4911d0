"""Interpolated modified Kneser-Ney (lm_jax.eval.ngram): every conditional distribution sums to
one, the lowest orders equal a brute-force recount of continuation counts, and bad input is a
clear error. Its PTB figure beside Mikolov et al.'s 141.2 is in benchmarks/RESULTS.md."""

import math
from collections import Counter

import numpy as np
import pytest

from lm_jax.eval.ngram import KneserNey, discounts
from lm_jax.scoring import EvalError

V = 1000


def _corpus(n=1500, seed=0):
    """Sentences from a peaky random Markov chain over 1000 words with Zipfian starts, so that
    every order's count-of-counts n_1..n_4 are > 0 (the discounts are defined)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(V)]
    trans = np.random.default_rng(0).dirichlet(np.full(V, 0.02), size=V)
    start = 1.0 / np.arange(1, V + 1)
    out = []
    for _ in range(n):
        s, cur = [], rng.choice(V, p=start / start.sum())
        for _ in range(rng.integers(2, 10)):
            s.append(words[cur])
            cur = rng.choice(V, p=trans[cur])
        out.append(s)
    return out


@pytest.fixture(scope="module")
def model():
    return KneserNey.fit(_corpus(), order=4)


def test_every_conditional_sums_to_one(model):
    rng = np.random.default_rng(1)
    seen = _corpus(20, seed=0)  # training sentences: histories seen at every order
    histories = [(), (0,)]  # empty, and <s> alone
    for s in seen[:10]:
        ids = [0] + model.encode(s)
        histories.append(tuple(ids[: rng.integers(1, len(ids) + 1)]))
    histories += [tuple(rng.integers(1, model.predictable + 1, 3)) for _ in range(10)]  # unseen
    for h in histories:
        total = sum(model.prob(w, h) for w in range(1, len(model.vocab)))
        assert total == pytest.approx(1.0, abs=1e-9), h
        assert all(model.prob(w, h) > 0 for w in range(1, len(model.vocab)))


def test_unigram_and_bigram_are_kneser_ney_of_a_recount(model):
    sents = _corpus()
    seqs = [["<s>"] + s + ["</s>"] for s in sents]
    bigram_types = {(a, b) for s in seqs for a, b in zip(s, s[1:], strict=False)}
    trigram_types = {t for s in seqs for t in zip(s, s[1:], s[2:], strict=False)}
    # unigram: continuation counts = distinct left neighbours
    cont1 = Counter(b for _, b in bigram_types)
    d1 = discounts(Counter(cont1.values()))
    n = [sum(1 for c in cont1.values() if (c == k if k < 3 else c >= 3)) for k in (1, 2, 3)]
    total = sum(cont1.values())
    gamma = (d1[0] * n[0] + d1[1] * n[1] + d1[2] * n[2]) / total
    V = len(cont1)  # every word but <s> has a left neighbour
    assert V == model.predictable
    for w, c in list(cont1.items())[:8]:
        want = (c - d1[min(c, 3) - 1]) / total + gamma / V
        assert model.prob(model.ids[w], ()) == pytest.approx(want, rel=1e-12)
    # bigram after an ordinary word: distinct left neighbours of each (v, w); after <s>: raw
    cont2 = Counter(t[1:] for t in trigram_types)
    raw2 = Counter((a, b) for s in seqs for a, b in zip(s, s[1:], strict=False))
    adj = {g: (raw2[g] if g[0] == "<s>" else cont2[g]) for g in raw2}
    d2 = discounts(Counter(adj.values()))
    for v in ("w3", "<s>"):
        row = {g[1]: c for g, c in adj.items() if g[0] == v}
        c_h = sum(row.values())
        nk = [sum(1 for c in row.values() if (c == k if k < 3 else c >= 3)) for k in (1, 2, 3)]
        g2 = sum(d * m for d, m in zip(d2, nk, strict=True)) / c_h
        for w in ("w1", "w7", "</s>"):
            c = row.get(w, 0)
            lower = model.prob(model.ids[w], ())
            want = max(c - (d2[min(c, 3) - 1] if c else 0), 0) / c_h + g2 * lower
            assert model.prob(model.ids[w], (model.ids[v],)) == pytest.approx(want, rel=1e-12)


def test_perplexity_counts_end_of_sentence_and_beats_unigram(model):
    test = [s for s in _corpus(300, seed=3) if all(w in model.ids for w in s)]
    assert len(test) > 100
    ppl, n = model.perplexity(test)
    assert n == sum(len(s) + 1 for s in test)
    uni = KneserNey.fit(_corpus(), order=1).perplexity(test)[0]
    assert 1.0 < ppl < uni  # context helps on a Markov chain
    lp = model.sentence_logprob(test[0])
    ids = [0] + model.encode(test[0] + ["</s>"])
    want = sum(math.log(model.prob(ids[i], tuple(ids[:i]))) for i in range(1, len(ids)))
    assert lp == pytest.approx(want)


def test_bad_input_is_a_clear_error(model):
    with pytest.raises(EvalError, match="not in the model's vocabulary"):
        model.encode(["never-seen"])
    with pytest.raises(EvalError, match="too little data"):
        KneserNey.fit([["a", "b"]], order=2)
    small = KneserNey.fit([["a", "b"], ["b", "a", "a"]], order=2, discount_fallback=(0.5, 1, 1.5))
    assert sum(small.prob(w, (small.ids["a"],)) for w in (1, 2, 3)) == pytest.approx(1.0)
    with pytest.raises(EvalError, match="order must be"):
        KneserNey.fit(_corpus(5), order=0)


@pytest.mark.slow
def test_kn5_on_penn_treebank_matches_mikolov_et_al():
    """Mikolov et al. (2011) report KN5 test perplexity 141.2 on this split (82,430 tokens)."""
    from lm_jax.data.sources import ptb_lines

    kn5 = KneserNey.fit([ln.split() for ln in ptb_lines("train")], order=5)
    ppl, n = kn5.perplexity([ln.split() for ln in ptb_lines("test")])
    assert n == 82_430
    assert abs(ppl - 141.2) / 141.2 < 0.03, ppl
