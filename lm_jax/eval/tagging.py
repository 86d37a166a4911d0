"""Sequence-labelling metrics over words: token accuracy (optionally through a tag mapping such as
Brown's `base_tag`), a most-frequent-tag baseline, and entity-level precision / recall / F1 with
`seqeval` (CoNLL's conlleval rules: an `I-x` after `O` or another type starts an entity).

Gold and predicted tags are lists of sentences, each a list of tag strings, aligned word by word.

`pos_scores` / `ner_scores` are the two tasks' report rows.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from lm_jax.errors import EvalError

Tags = Sequence[Sequence[str]]


def _check_aligned(gold: Tags, pred: Tags) -> None:
    if len(gold) != len(pred):
        raise EvalError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise EvalError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")


def token_accuracy(gold: Tags, pred: Tags, mapping: Callable[[str], str] | None = None) -> float:
    """Share of words whose predicted tag equals the gold one (both through `mapping`)."""
    _check_aligned(gold, pred)
    f = mapping or (lambda t: t)
    pairs = [(f(g), f(p)) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
    if not pairs:
        raise EvalError("no words to score")
    return sum(g == p for g, p in pairs) / len(pairs)


class MostFrequentTag:
    """The classic baseline: each word gets the tag it carries most often in training (ties:
    the tag seen first); a word never seen gets the most frequent tag overall. `lowercase`
    also matches words case-insensitively before falling back."""

    def __init__(self, words: Tags, tags: Tags, lowercase: bool = True):
        by_word: dict[str, Counter] = defaultdict(Counter)
        by_lower: dict[str, Counter] = defaultdict(Counter)
        overall: Counter = Counter()
        for ws, ts in zip(words, tags):
            for w, t in zip(ws, ts):
                by_word[w][t] += 1
                by_lower[w.lower()][t] += 1
                overall[t] += 1
        if not overall:
            raise EvalError("the most-frequent-tag baseline needs tagged training words")
        self.table = {w: c.most_common(1)[0][0] for w, c in by_word.items()}
        self.lower = {w: c.most_common(1)[0][0] for w, c in by_lower.items()} if lowercase else {}
        self.default = overall.most_common(1)[0][0]

    def tag(self, word: str) -> str:
        if word in self.table:
            return self.table[word]
        return self.lower.get(word.lower(), self.default)

    def predict(self, sentences: Tags) -> list[list[str]]:
        return [[self.tag(w) for w in ws] for ws in sentences]


def entity_scores(gold: Tags, pred: Tags) -> dict:
    """Entity-level micro precision / recall / F1 (seqeval, conlleval mode), the number of gold
    entities, and each type's F1 as `f1_<type>` (all flat floats, as metric logs want)."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    _check_aligned(gold, pred)
    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    types = {k: v for k, v in sorted(report.items()) if not k.endswith(" avg")}
    return {
        "entity_f1": float(f1_score(gold, pred, zero_division=0)),
        "entity_precision": float(precision_score(gold, pred, zero_division=0)),
        "entity_recall": float(recall_score(gold, pred, zero_division=0)),
        "entities_gold": float(sum(int(v["support"]) for v in types.values())),
        **{f"f1_{k}": float(v["f1-score"]) for k, v in types.items()},
    }


def pos_scores(gold: Tags, pred: Tags, base: Callable[[str], str] | None = None) -> dict:
    """POS rows: accuracy on the full tag set and, with `base`, on base tags."""
    out = {"accuracy": token_accuracy(gold, pred)}
    if base is not None:
        out["base_accuracy"] = token_accuracy(gold, pred, base)
    out["words"] = float(sum(len(g) for g in gold))
    return out


def ner_scores(gold: Tags, pred: Tags) -> dict:
    """NER rows: entity scores (seqeval) and word accuracy."""
    return {**entity_scores(gold, pred), "accuracy": token_accuracy(gold, pred)}
