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
length so that padded batches waste little, with lengths on a geometric ladder
(`lm_jax.utils.length_bucket`) to bound recompiles. Requests that share a context (the choices
of one multiple-choice document) run that context once (`Scorer.score_after_context`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm_jax.eval.perplexity import batch_rows
from lm_jax.scoring import EvalError, Scorer
from lm_jax.utils import length_bucket


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
    share_contexts: bool = True,
) -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), every continuation token the argmax) per (ctx ids, cont ids).

    Pairs that share their context ids (a multiple-choice document's choices) go through
    `Scorer.score_after_context` when `share_contexts` and the scorer allows it: the context
    once, then each continuation over its cache (same numbers). The rest are scored whole. A
    pair longer than `max_len` + 1 tokens loses its oldest context tokens (and, if the
    continuation alone is longer, its first tokens are context too)."""
    for ctx, cont in pairs:
        if len(cont) == 0:
            raise EvalError("a continuation is empty: there is nothing to score")
        if len(ctx) + len(cont) < 2:
            raise EvalError("a request has a single token: give it a context (or a BOS token)")
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    whole = list(range(len(pairs)))
    if share_contexts and scorer.shares_contexts:
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if len(ctx) + len(cont) <= max_len + 1:
                groups.setdefault(tuple(ctx), []).append(i)
        _score_shared(scorer, pairs, [g for g in groups.values() if len(g) > 1], batch_size, out)
        whole = [i for i, o in enumerate(out) if o is None]  # alone, too long, or refused
    _score_whole(scorer, max_len, pairs, whole, batch_size, out)
    return out  # type: ignore[return-value]


def _score_whole(scorer, max_len, pairs, which, batch_size, out) -> None:
    """Score `which` pairs as whole rows (context + continuation), longest first."""
    seqs, n_cont = {}, {}
    for i in which:
        ctx, cont = pairs[i]
        seq = (list(ctx) + list(cont))[-(max_len + 1) :]
        seqs[i] = np.asarray(seq, np.int32)
        n_cont[i] = min(len(cont), len(seq) - 1)
    order = sorted(which, key=lambda i: -len(seqs[i]))  # longest first, as lm-eval
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = min(length_bucket(max(len(seqs[i]) - 1 for i in idx)), max_len)
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


# Tokens one shared-context call may hold: continuation rows x (context + continuation)
# positions (attention scores and the per-row KV cache grow with it); longer calls get fewer rows.
SHARED_CALL_TOKENS = 1 << 16


def _pack(pieces, batch_size: int, n_rows: int) -> list[list]:
    """Consecutive pieces (context ids, pair indices) into calls of at most `batch_size`
    contexts and `n_rows` continuation rows."""
    calls, cur, used = [], [], 0
    for piece in pieces:
        if cur and (len(cur) == batch_size or used + len(piece[1]) > n_rows):
            calls.append(cur)
            cur, used = [], 0
        cur.append(piece)
        used += len(piece[1])
    return calls + [cur]


def _score_shared(scorer, pairs, groups, batch_size, out) -> None:
    """Score groups of pairs with one context each through `score_after_context`, up to
    `batch_size` contexts and a fixed number of continuation rows per call (the mean group
    size times `batch_size`, to a power of two; fewer, a power of two, where rows x positions
    would pass `SHARED_CALL_TOKENS`), longest contexts first. A call whose padded context +
    continuation would pass the model's max_len is left to `_score_whole`."""
    if not groups:
        return
    mean = sum(map(len, groups)) / len(groups)
    n_rows = length_bucket(int(np.ceil(mean * batch_size)), batch_size, 1)
    pieces = []  # (context ids, pair indices), groups wider than a call split
    for g in sorted(groups, key=lambda g: -len(pairs[g[0]][0])):
        pieces += [(pairs[g[0]][0], g[k : k + n_rows]) for k in range(0, len(g), n_rows)]
    for call in _pack(pieces, batch_size, n_rows):
        Tc = length_bucket(max(len(ctx) - 1 for ctx, _ in call), 8)
        Tn = length_bucket(max(len(pairs[i][1]) for _, g in call for i in g), 1, 1)
        if Tc + Tn > scorer.cfg.max_len:
            continue
        cap = max(1, SHARED_CALL_TOKENS // (Tc + Tn))
        cap = min(n_rows, 1 << (cap.bit_length() - 1))
        if cap == n_rows:
            _score_call(scorer, pairs, call, batch_size, n_rows, Tc, Tn, out)
            continue
        narrow = [(ctx, g[k : k + cap]) for ctx, g in call for k in range(0, len(g), cap)]
        for sub in _pack(narrow, min(batch_size, cap), cap):
            _score_call(scorer, pairs, sub, min(batch_size, cap), cap, Tc, Tn, out)


def _score_call(scorer, pairs, call, batch_size, n_rows, Tc, Tn, out) -> None:
    """One `score_after_context` call: `call`'s contexts [batch_size, Tc] and its continuation
    rows [n_rows, Tn]; the scores go to `out`."""
    context = np.zeros((batch_size, Tc), np.int32)
    rows = {k: np.zeros((n_rows, Tn), np.int32) for k in ("inputs", "targets", "positions")}
    rows["loss_mask"] = np.zeros((n_rows, Tn), np.float32)
    owner, r, where = np.zeros(n_rows, np.int32), 0, []
    for c, (ctx, g) in enumerate(call):
        context[c, : len(ctx) - 1] = ctx[:-1]
        for i in g:
            cont = list(pairs[i][1])
            n = len(cont)
            rows["inputs"][r, :n] = [ctx[-1]] + cont[:-1]
            rows["targets"][r, :n] = cont
            rows["positions"][r] = len(ctx) - 1 + np.arange(Tn)
            rows["loss_mask"][r, :n] = 1.0
            owner[r] = c
            where.append((r, i))
            r += 1
    s = scorer.score_after_context(context, owner, rows)
    for r, i in where:
        out[i] = (float(s.sums[r]), bool(s.greedy[r] > 0.5))


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
