"""Interpolated modified Kneser-Ney n-gram language model (Chen & Goodman 1999), the count-based
baseline of the language-modelling literature (Mikolov et al. 2011: KN5 on Penn Treebank).

Conventions, those of SRILM's `ngram-count -kndiscount -interpolate` as the PTB papers used it:
- a sentence is `<s> w_1 ... w_n </s>`; `<s>` is context only (never predicted), `</s>` is
  predicted and counted as a word in perplexity;
- the highest order keeps raw counts; a lower-order n-gram keeps its *continuation count*, the
  number of distinct words seen before it, except n-grams that start with `<s>` (nothing can
  precede them), which keep raw counts;
- each order has three discounts from its count-of-counts n_1..n_4:
  Y = n_1 / (n_1 + 2 n_2), D_1 = 1 - 2Y n_2/n_1, D_2 = 2 - 3Y n_3/n_2, D_3+ = 3 - 4Y n_4/n_3;
- p(w | h) = max(c(h w) - D(c(h w)), 0) / c(h) + gamma(h) p(w | h'), with
  gamma(h) = (D_1 N_1(h .) + D_2 N_2(h .) + D_3+ N_3+(h .)) / c(h), h' = h without its oldest word;
  a history never seen backs off whole (p(w | h) = p(w | h')); the unigrams interpolate with the
  uniform distribution over the vocabulary (every predictable word, `</s>` included), so every
  conditional distribution sums to one.

Counts live in Python dicts keyed by word-id tuples: a 5-gram model of the PTB training set
(930k tokens) fits in a few seconds and a few hundred MB.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lm_jax.errors import EvalError

BOS, EOS = "<s>", "</s>"


def discounts(count_of_counts: Counter, fallback=None) -> tuple[float, float, float]:
    """(D_1, D_2, D_3+) of modified Kneser-Ney from n_1..n_4 (Chen & Goodman's estimates);
    `fallback` (D_1, D_2, D_3+) where they are undefined (some n_k = 0), as KenLM's
    `--discount_fallback`, else an EvalError."""
    n1, n2, n3, n4 = (count_of_counts.get(k, 0) for k in (1, 2, 3, 4))
    if min(n1, n2, n3, n4) == 0:
        if fallback is not None:
            return tuple(float(d) for d in fallback)
        raise EvalError(
            f"too little data for Kneser-Ney discounts: count-of-counts n1..n4 = {n1, n2, n3, n4}"
            " (every one must be > 0): train on more text, use a lower order or pass"
            " discount_fallback"
        )
    y = n1 / (n1 + 2 * n2)
    return 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3


@dataclass
class _Order:
    counts: dict  # n-gram tuple -> (adjusted) count
    history: dict  # history tuple -> (c(h), N_1(h .), N_2(h .), N_3+(h .))
    d: tuple[float, float, float]

    def discount(self, c: float) -> float:
        return 0.0 if c == 0 else self.d[min(int(c), 3) - 1]


class KneserNey:
    """Interpolated modified Kneser-Ney LM of `order` over whitespace words (module docstring)."""

    def __init__(self, order: int, vocab: Sequence[str], orders: list[_Order]):
        self.order, self.vocab = order, list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self._orders = orders  # [k - 1] = the order-k model

    @classmethod
    def fit(
        cls, sentences: Iterable[Sequence[str]], order: int = 5, discount_fallback=None
    ) -> KneserNey:
        """Count every n-gram up to `order` in `sentences` (lists of words); `discount_fallback`
        (e.g. KenLM's (0.5, 1.0, 1.5)) for orders whose count-of-counts leave the discounts
        undefined (small vocabularies: every word seen after several others)."""
        if order < 1:
            raise EvalError(f"order must be >= 1, got {order}")
        vocab: dict[str, int] = {BOS: 0}
        seqs = []
        for words in sentences:
            seq = [0] + [vocab.setdefault(w, len(vocab)) for w in words]
            seqs.append(seq + [vocab.setdefault(EOS, len(vocab))])
        if not seqs:
            raise EvalError("no training sentences")
        raw = [Counter() for _ in range(order)]  # raw[k - 1]: order-k n-gram counts
        for seq in seqs:
            for k in range(1, order + 1):
                raw[k - 1].update(zip(*(seq[j:] for j in range(k))))
        orders: list[_Order] = []
        for k in range(1, order + 1):
            if k == order:
                counts = dict(raw[k - 1])
            else:  # continuation counts: distinct words before the n-gram (raw after <s>)
                counts = Counter(g[1:] for g in raw[k])
                for g, c in raw[k - 1].items():
                    if g[0] == 0:
                        counts[g] = c
                counts = dict(counts)
            counts.pop((0,), None)  # <s> is never predicted
            d = discounts(Counter(counts.values()), discount_fallback)
            history: dict[tuple, list] = {}
            for g, c in counts.items():
                h = history.setdefault(g[:-1], [0, 0, 0, 0])
                h[0] += c
                h[min(c, 3)] += 1
            orders.append(_Order(counts, {h: tuple(v) for h, v in history.items()}, d))
        words = sorted(vocab, key=vocab.get)
        return cls(order, words, orders)

    @property
    def predictable(self) -> int:
        """Size of the predicted vocabulary (every word but <s>; <\\s> included)."""
        return len(self.vocab) - 1

    def prob(self, word: int, history: tuple) -> float:
        """p(word | history) (ids; the last `order` - 1 history ids are used)."""
        history = tuple(history)[max(0, len(history) - self.order + 1) :]
        p = 1.0 / self.predictable
        for k in range(1, len(history) + 2):  # lowest order first
            o, h = self._orders[k - 1], history[len(history) - k + 1 :]
            stats = o.history.get(h)
            if stats is None:  # history never seen at this order: keep the lower-order p
                continue
            c_h, n1, n2, n3 = stats
            c = o.counts.get(h + (word,), 0)
            gamma = (o.d[0] * n1 + o.d[1] * n2 + o.d[2] * n3) / c_h
            p = max(c - o.discount(c), 0.0) / c_h + gamma * p
        return p

    def encode(self, words: Sequence[str], unk: str = "<unk>") -> list[int]:
        """Word ids; words outside the vocabulary become `unk` (an EvalError if it is absent)."""
        out = []
        for w in words:
            i = self.ids.get(w, self.ids.get(unk))
            if i is None or w == BOS:
                raise EvalError(
                    f"word {w!r} is not in the model's vocabulary and it has no {unk!r} word: "
                    "map rare words to an unknown-word token before fitting"
                )
            out.append(i)
        return out

    def sentence_logprob(self, words: Sequence[str]) -> float:
        """Natural-log probability of `words` followed by </s>, from <s>."""
        seq = [0] + self.encode(list(words) + [EOS])
        return sum(
            math.log(self.prob(seq[i], tuple(seq[max(0, i - self.order + 1) : i])))
            for i in range(1, len(seq))
        )

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> tuple[float, int]:
        """(perplexity per predicted token, tokens): words plus one </s> per sentence."""
        total, n = 0.0, 0
        for words in sentences:
            total += self.sentence_logprob(words)
            n += len(words) + 1
        if n == 0:
            raise EvalError("no sentences to score")
        return math.exp(-total / n), n
