"""Request-level scoring as the evaluation harness defines it, on the one scorer.

Three request kinds, the ones EleutherAI's lm-evaluation-harness asks a model for:
- `loglikelihood_pairs`: (context, continuation) -> (log p(continuation | context), greedy), the
  pair tokenised as a whole and split where the context's tokens end (trailing spaces of the
  context move to the continuation), as lm-eval's own `hf` backend does, so the two backends
  see the same token ids;
- `rolling_loglikelihood`: log p(text), the text cut into windows of at most `max_len`
  predictions, each with as much preceding context as fits (lm-eval's rolling windows);
- `generate_until` lives in `lm_jax.eval.harness` (the one sampler, `lm_jax.generate`).

Every row goes through `lm_jax.scoring.Scorer` (sharded over a mesh when given), sorted by
length so that padded batches waste little, with lengths bucketed to bound recompiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm_jax.eval.perplexity import batch_rows
from lm_jax.scoring import EvalError, Scorer
from lm_jax.utils import round_up

LENGTH_BUCKET = 16


def encode(tokenizer, text: str, add_bos: bool) -> list[int]:
    """Token ids of `text`; `add_bos`: with the tokenizer's special tokens (its BOS)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_bos))
    except TypeError:  # tokenizers without the keyword (char / byte): no specials to add
        ids = list(tokenizer.encode(text))
        bos = getattr(tokenizer, "bos_id", None)
        return ([bos] + ids) if add_bos and bos is not None else ids


def prefix_token(tokenizer) -> int:
    """The token that stands for an empty context: BOS, else EOS."""
    for name in ("bos_id", "eos_id"):
        t = getattr(tokenizer, name, None)
        if t is not None:
            return int(t)
    raise EvalError("the tokenizer has neither BOS nor EOS to stand for an empty context")


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False):
    """(context ids, continuation ids) of one request, split from the whole pair's encoding."""
    if context == "":
        cont = encode(tokenizer, continuation, False)
        if not cont:
            raise EvalError(f"continuation {continuation!r} tokenizes to nothing")
        pre = prefix_token(tokenizer)
        return ([pre], cont) if cont[0] != pre else (cont[:1], cont[1:])
    n_space = len(context) - len(context.rstrip())  # any whitespace, as lm-eval 0.4.13
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = encode(tokenizer, context + continuation, add_bos)
    ctx = encode(tokenizer, context, add_bos)
    return whole[: len(ctx)], whole[len(ctx) :]


def score_token_pairs(
    scorer: Scorer,
    max_len: int,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
) -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), every continuation token the argmax) per (ctx ids, cont ids).

    A pair longer than `max_len` + 1 tokens loses its oldest context tokens (and, if the
    continuation alone is longer, its first tokens are context too)."""
    seqs, n_cont = [], []
    for ctx, cont in pairs:
        if len(cont) == 0:
            raise EvalError("a continuation is empty: there is nothing to score")
        seq = (list(ctx) + list(cont))[-(max_len + 1) :]
        if len(seq) < 2:
            raise EvalError("a request has a single token: give it a context (or a BOS token)")
        seqs.append(np.asarray(seq, np.int32))
        n_cont.append(min(len(cont), len(seq) - 1))
    order = np.argsort([-len(s) for s in seqs], kind="stable")  # longest first, as lm-eval
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = min(round_up(max(len(seqs[i]) - 1 for i in idx), LENGTH_BUCKET), max_len)
        rows = []
        for i in idx:
            seq, n = seqs[i], len(seqs[i]) - 1
            row = {
                "inputs": np.zeros(T, np.int32),
                "targets": np.zeros(T, np.int32),
                "loss_mask": np.zeros(T, np.float32),
            }
            row["inputs"][:n], row["targets"][:n] = seq[:-1], seq[1:]
            row["loss_mask"][n - n_cont[i] : n] = 1.0
            rows.append(row)
        (batch,) = batch_rows(rows, batch_size)
        s = scorer.score(batch)
        for j, i in enumerate(idx):
            out[i] = (float(s.sums[j]), bool(s.greedy[j] > 0.5))
    return out


def loglikelihood_pairs(
    scorer: Scorer,
    tokenizer,
    max_len: int,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    add_bos: bool = False,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) per (context, continuation) string pair."""
    pairs = [encode_pair(tokenizer, c, x, add_bos) for c, x in requests]
    return score_token_pairs(scorer, max_len, pairs, batch_size)


def rolling_windows(ids: Sequence[int], prefix: int, max_len: int) -> list[tuple[list, list]]:
    """(context ids, predicted ids) windows covering every token of `ids` once: window k
    predicts ids[k * max_len : (k + 1) * max_len] from the `max_len` tokens before them (the
    prefix token before the first)."""
    full = [prefix] + list(ids)
    out = []
    for s in range(0, len(ids), max_len):
        e = min(s + max_len, len(ids))  # predicts full[s + 1 : e + 1] = ids[s:e]
        lo = max(0, e - max_len)
        out.append((full[lo : s + 1], full[s + 1 : e + 1]))
    return out


def rolling_loglikelihood(
    scorer: Scorer,
    tokenizer,
    max_len: int,
    texts: Sequence[str],
    batch_size: int = 16,
    add_bos: bool = False,
) -> list[float]:
    """log p(text) per text, every token scored once (`rolling_windows`)."""
    pre = prefix_token(tokenizer)
    owner, pairs = [], []
    for i, t in enumerate(texts):
        for w in rolling_windows(encode(tokenizer, t, add_bos), pre, max_len):
            owner.append(i)
            pairs.append(w)
    totals = np.zeros(len(texts))
    scored = score_token_pairs(scorer, max_len, pairs, batch_size)
    for i, (ll, _) in zip(owner, scored, strict=True):
        totals[i] += ll
    return [float(x) for x in totals]
