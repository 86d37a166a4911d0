"""BLEU / chrF / ROUGE wrappers equal direct library calls; Distinct-n and Self-BLEU by hand."""

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lm_jax.eval.generation_metrics import (
    bleu,
    chrf,
    distinct_n,
    generation_report,
    rouge,
    self_bleu,
)
from lm_jax.eval.perplexity import EvalError

HYPS = [
    "A man in an orange hat is looking at something.",
    "A dog runs on the green grass in front of a fence.",
    "A girl in a karate uniform breaks a board.",
]
REFS = [
    "A man in an orange hat starring at something.",
    "A Boston Terrier is running on lush green grass in front of a white fence.",
    "A girl in karate uniform breaking a stick with a front kick.",
]
REFS2 = [
    "A man wearing an orange hat looks at something.",
    "A small dog is running across green grass near a fence.",
    "A girl in a karate outfit kicks a board in half.",
]


def test_bleu_chrf_equal_sacrebleu():
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    multi = [[a, b] for a, b in zip(REFS, REFS2)]
    assert bleu(HYPS, multi) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score)
    assert chrf(HYPS, multi) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS, REFS2]).score)
    assert bleu(HYPS, multi) > bleu(HYPS, REFS)  # a second reference can only help here
    # ragged: the second example has one reference only
    ragged = [[REFS[0], REFS2[0]], [REFS[1]], [REFS[2], REFS2[2]]]
    direct = sacrebleu.corpus_bleu(HYPS, [REFS, [REFS2[0], None, REFS2[2]]]).score
    assert bleu(HYPS, ragged) == pytest.approx(direct)


def test_rouge_equal_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = rouge(HYPS, REFS)
    for t in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(r, h)[t].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
        assert got[t] == pytest.approx(100 * want)
    multi = [[a, b] for a, b in zip(REFS, REFS2)]
    got = rouge(HYPS, multi)
    want = sum(scorer.score_multi(r, h)["rouge2"].fmeasure for h, r in zip(HYPS, multi)) / 3
    assert got["rouge2"] == pytest.approx(100 * want)


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran", "a dog"]
    # unigrams: the cat sat the cat ran a dog -> 8 total, distinct {the cat sat ran a dog} = 6
    assert distinct_n(texts, 1) == pytest.approx(6 / 8)
    # bigrams: (the cat)(cat sat)(the cat)(cat ran)(a dog) -> 5 total, 4 distinct
    assert distinct_n(texts, 2) == pytest.approx(4 / 5)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(["a"], 2) == 0.0


def test_self_bleu_by_hand():
    # Each sample against the other: 1-4 gram matches 3/4, 2/3, 1/2, 0/1; sacrebleu's 'exp'
    # smoothing turns the zero 4-gram precision into 1 / (2 * 1); equal lengths, BP = 1.
    texts = ["a b c d", "a b c e"]
    want = 100 * math.exp(
        (math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4
    )
    assert self_bleu(texts) == pytest.approx(want, rel=1e-6)
    assert self_bleu(["same words here ok"] * 3) == pytest.approx(100.0)
    assert self_bleu(["a b c d", "w x y z"]) < 1.0


def test_report_and_bad_input():
    rep = generation_report(HYPS, REFS)
    assert set(rep) >= {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2"}
    with pytest.raises(EvalError, match="3 hypotheses but 2 references"):
        bleu(HYPS, REFS[:2])
    with pytest.raises(EvalError, match="3 hypotheses but 4 references"):
        rouge(HYPS, REFS + ["x"])
    with pytest.raises(EvalError, match="empty"):
        chrf([], [])
    with pytest.raises(EvalError, match="at least 2"):
        self_bleu(["only one"])
    with pytest.raises(EvalError, match="non-empty"):
        distinct_n([], 1)
