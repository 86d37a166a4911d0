"""Generation metrics through the maintained libraries (sacrebleu, rouge-score).

References are given per hypothesis: `refs[i]` is a string (one reference) or a list of strings
(several references for hypothesis i; their number may vary). Scores are on sacrebleu's 0-100
scale. BLEU / chrF use sacrebleu's standard settings (13a tokenisation, exp smoothing; chrF
char order 6, beta 2), i.e. exactly `sacrebleu.corpus_bleu` / `sacrebleu.corpus_chrf`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from lm_jax.eval.perplexity import EvalError


def _check(hyps: Sequence[str], refs: Sequence) -> list[list[str]]:
    """Validate and normalise references to one list of strings per hypothesis."""
    if isinstance(hyps, str) or isinstance(refs, str):
        raise EvalError("hypotheses and references must be lists (one entry per example)")
    if len(hyps) == 0:
        raise EvalError("no hypotheses given: the evaluation set is empty")
    if len(hyps) != len(refs):
        raise EvalError(
            f"{len(hyps)} hypotheses but {len(refs)} references: give one reference (or one "
            "list of references) per hypothesis"
        )
    out = []
    for i, r in enumerate(refs):
        rs = [r] if isinstance(r, str) else list(r)
        if not rs or not all(isinstance(x, str) for x in rs):
            raise EvalError(
                f"references of example {i} must be a string or non-empty list of strings"
            )
        out.append(rs)
    return out


def reference_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis reference lists -> sacrebleu's reference streams (None pads ragged ones)."""
    k = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(k)]


def bleu(hyps: Sequence[str], refs: Sequence, **kw) -> float:
    """Corpus BLEU (sacrebleu.corpus_bleu, standard settings unless overridden in kw)."""
    import sacrebleu

    refs = _check(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), reference_streams(refs), **kw).score)


def chrf(hyps: Sequence[str], refs: Sequence, **kw) -> float:
    """Corpus chrF (sacrebleu.corpus_chrf; chrF++ with word_order=2)."""
    import sacrebleu

    refs = _check(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), reference_streams(refs), **kw).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(
    hyps: Sequence[str], refs: Sequence, use_stemmer: bool = True, types=ROUGE_TYPES
) -> dict[str, float]:
    """Mean ROUGE F1 (x100) over examples; several references: the best one per example
    (rouge_score's `score_multi`)."""
    from rouge_score import rouge_scorer

    refs = _check(hyps, refs)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(types, 0.0)
    for h, rs in zip(hyps, refs, strict=True):
        scores = scorer.score(rs[0], h) if len(rs) == 1 else scorer.score_multi(rs, h)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100.0 * v / len(hyps) for t, v in totals.items()}


def _ngrams(tokens: list[str], n: int):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams over all samples
    (whitespace tokens); 0 when there are no n-grams."""
    if isinstance(texts, str) or len(texts) == 0:
        raise EvalError("distinct_n needs a non-empty list of samples")
    if n < 1:
        raise EvalError(f"n must be >= 1, got {n}")
    counts: Counter = Counter()
    for t in texts:
        counts.update(_ngrams(t.split(), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def self_bleu(texts: Sequence[str], **kw) -> float:
    """Self-BLEU (Zhu et al., 2018): mean sentence BLEU (sacrebleu.sentence_bleu) of each sample
    with all the other samples as its references. Higher = less diverse."""
    import sacrebleu

    if isinstance(texts, str) or len(texts) < 2:
        raise EvalError("self_bleu needs at least 2 samples")
    scores = [
        sacrebleu.sentence_bleu(t, [o for j, o in enumerate(texts) if j != i], **kw).score
        for i, t in enumerate(texts)
    ]
    return float(sum(scores) / len(scores))


def generation_report(hyps: Sequence[str], refs: Sequence) -> dict[str, float]:
    """BLEU, chrF, ROUGE-1/2/L and Distinct-1/2 of hypotheses against references."""
    out = {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), **rouge(hyps, refs)}
    out["distinct_1"] = distinct_n(hyps, 1)
    out["distinct_2"] = distinct_n(hyps, 2)
    return out
