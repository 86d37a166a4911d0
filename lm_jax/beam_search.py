"""Beam search for decoder LMs, on the sampler's prompt plan, prefill and KV cache.

The search is HF transformers' (`generate(num_beams=...)`, the vectorised version), so the same
model gives the same token ids. Per step i (generated length i + 1), for each prompt b:
- every running beam's log-softmax + its running score -> [num_beams * V] candidates, the top
  `2 * num_beams` kept (sorted by score);
- a candidate ending in a stop token, or at the last step, "hits": it can only become a
  finished hypothesis, with score sum_logprobs / (i + 1) ** length_penalty, and only if it is
  among the top `num_beams` candidates; the finished set keeps the best `num_beams`;
- the best `num_beams` candidates that do not hit continue (their cache rows are gathered);
- early stopping: `early_stopping=True` stops a prompt once `num_beams` hypotheses are
  finished; `False` (HF's default) stops it once the best running beam, scored at the current
  length, cannot beat the worst finished one; `"never"` scores it at the maximum length when
  length_penalty > 0.
The loop ends when no prompt can improve, or at `max_new_tokens`.

One jitted program per static setting: a prefill of the B prompts (its cache rows repeated per
beam), then a `lax.while_loop` of one-token forwards over B * num_beams rows at their own
positions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm_jax.configs.base import ModelConfig
from lm_jax.generate import CACHE_NAMES, plan_generation
from lm_jax.nn.transformer import Transformer, init_cache
from lm_jax.prefill import DEFAULT_CHUNK, check_chunk, prefill
from lm_jax.sharding import constrain

NEG = -1.0e9  # HF's "never chosen" score


class BeamOutput(NamedTuple):
    """tokens [B, N] (pad_id after each hypothesis), lengths [B] (including the stop token),
    scores [B] (summed log-probs / length ** length_penalty), finished [B] (ended in a stop
    token rather than at max_new_tokens)."""

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    finished: jax.Array


class _Beams(NamedTuple):
    i: jax.Array  # step index (generated length before this step)
    logits: jax.Array  # [B * nb, V] next-token logits of the running beams
    cache: object
    run_tokens: jax.Array  # [B, nb, N]
    run_scores: jax.Array  # [B, nb] summed log-probs
    fin_tokens: jax.Array  # [B, nb, N]
    fin_scores: jax.Array  # [B, nb] length-penalised (NEG: empty slot)
    fin_lengths: jax.Array  # [B, nb]
    fin_flags: jax.Array  # [B, nb] the slot holds a finished hypothesis
    open: jax.Array  # [B] improvement still possible (HF's early-stop heuristic unmet)
    all_hit: jax.Array  # every kept candidate of the last step hit (max length)


def _gather(x, idx):
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, J]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


@functools.lru_cache(maxsize=16)
def _beam_fn(config: ModelConfig, cache_len: int, max_new: int, num_beams: int,
             length_penalty: float, early_stopping, prefill_chunk: int):  # fmt: skip
    model = Transformer(config)
    nb, N = num_beams, max_new
    keep = 2 * nb  # HF: max(2, 1 + number of eos ids) * num_beams; the stop list is one set here

    def run(params, tokens, lengths, stop, pad_id):
        B = tokens.shape[0]
        cache = init_cache(config, B, cache_len)
        cache = jax.tree.map(lambda c: constrain(c, CACHE_NAMES), cache)
        last, cache = prefill(model, params, tokens, cache, lengths - 1, chunk=prefill_chunk)
        rep = lambda x: jnp.repeat(x, nb, axis=0)  # noqa: E731  [B, ...] -> [B * nb, ...]
        cache = jax.tree.map(lambda c: jnp.repeat(c, nb, axis=1), cache)  # [L, B * nb, ...]
        row_lengths = rep(lengths)
        first = jnp.zeros((B, nb), jnp.float32).at[:, 1:].set(NEG)  # step 0: beam 0 only
        s0 = _Beams(
            i=jnp.int32(0), logits=rep(last).astype(jnp.float32), cache=cache,
            run_tokens=jnp.full((B, nb, N), pad_id, jnp.int32), run_scores=first,
            fin_tokens=jnp.full((B, nb, N), pad_id, jnp.int32),
            fin_scores=jnp.full((B, nb), NEG, jnp.float32),
            fin_lengths=jnp.zeros((B, nb), jnp.int32), fin_flags=jnp.zeros((B, nb), bool),
            open=jnp.ones((B,), bool),
            all_hit=jnp.bool_(False),
        )  # fmt: skip

        def step(s: _Beams) -> _Beams:
            V = s.logits.shape[-1]
            logp = jax.nn.log_softmax(s.logits, axis=-1).reshape(B, nb, V)
            acc = (logp + s.run_scores[:, :, None]).reshape(B, nb * V)
            top, idx = jax.lax.top_k(acc, keep)  # [B, keep], sorted
            src, tok = idx // V, (idx % V).astype(jnp.int32)
            seqs = _gather(s.run_tokens, src)
            seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, s.i))
            stopped = jnp.any(tok[..., None] == stop, axis=-1)
            hit = stopped | (s.i + 1 >= N)
            # the beams that continue: the best nb candidates that did not hit
            live = top + hit.astype(jnp.float32) * NEG
            _, nxt = jax.lax.top_k(live, nb)
            run_scores = _gather(live, nxt)
            run_tokens = _gather(seqs, nxt)
            # finished hypotheses: top-nb candidates that hit, merged with the finished set
            gen_len = (s.i + 1).astype(jnp.float32)
            cand = top / gen_len**length_penalty
            # HF's penalties, each added on its own (a full or closed prompt adds nothing)
            just = hit & (jnp.arange(keep) < nb)[None]
            full = jnp.all(s.fin_flags, axis=1, keepdims=True) & (early_stopping is True)
            cand = cand + full * NEG + (~s.open[:, None]) * NEG + (~just) * NEG
            scores = jnp.concatenate([s.fin_scores, cand], axis=1)
            _, best = jax.lax.top_k(scores, nb)
            cat = lambda a, b: _gather(jnp.concatenate([a, b], axis=1), best)  # noqa: E731
            fin_scores = _gather(scores, best)
            fin_tokens = cat(s.fin_tokens, seqs)
            fin_lengths = cat(s.fin_lengths, jnp.broadcast_to(s.i + 1, (B, keep)))
            fin_flags = cat(s.fin_flags, just)
            # HF's early-stop heuristic, at the new generated length
            if early_stopping == "never" and length_penalty > 0.0:
                hypothetical = jnp.float32(N)
            else:
                hypothetical = gen_len
            best_running = run_scores[:, 0] / hypothetical**length_penalty
            worst = jnp.where(fin_flags, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
            still = jnp.any(best_running[:, None] > worst, axis=1)
            # next forward: the continuing beams' tokens, their cache rows first
            rows = (jnp.arange(B)[:, None] * nb + _gather(src, nxt)).reshape(-1)
            cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=1), s.cache)
            new_tok = _gather(tok, nxt).reshape(-1)
            pos = (row_lengths + s.i)[:, None]
            lg, cache = model.apply({"params": params}, new_tok[:, None], pos, cache=cache)
            return _Beams(
                i=s.i + 1, logits=lg[:, 0].astype(jnp.float32), cache=cache,
                run_tokens=run_tokens, run_scores=run_scores, fin_tokens=fin_tokens,
                fin_scores=fin_scores, fin_lengths=fin_lengths, fin_flags=fin_flags,
                open=s.open & still, all_hit=jnp.all(hit),
            )  # fmt: skip

        def cond(s: _Beams):
            improvable = jnp.any(s.open)
            open_beam = ~(jnp.all(s.fin_flags) & (early_stopping is True))
            return (s.i < N) & improvable & open_beam & ~s.all_hit

        s = jax.lax.while_loop(cond, step, s0)
        n = s.fin_lengths[:, 0]
        toks = jnp.where(jnp.arange(N)[None] < n[:, None], s.fin_tokens[:, 0], pad_id)
        last = jnp.take_along_axis(toks, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        finished = jnp.any(last[:, None] == stop, axis=-1)
        return BeamOutput(toks, n, s.fin_scores[:, 0], finished)

    return jax.jit(run)


def beam_search(
    config: ModelConfig,
    params,
    prompt_tokens,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    prompt_lengths=None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    max_len: int | None = None,
    prefill_chunk: int = DEFAULT_CHUNK,
) -> BeamOutput:
    """The best of `num_beams` beams for each prompt (see the module docstring); prompts and
    `prefill_chunk` as in `generate`. num_beams=1 is greedy decoding."""
    prefill_chunk = check_chunk(prefill_chunk)
    if int(num_beams) < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
    if int(max_new_tokens) < 1:
        raise ValueError(f"beam search needs max_new_tokens >= 1, got {max_new_tokens}.")
    if int(num_beams) * 2 > config.vocab_size:
        raise ValueError(
            f"num_beams={num_beams} keeps {2 * num_beams} candidates a step, more than the "
            f"vocabulary of {config.vocab_size}: lower num_beams."
        )
    plan = plan_generation(
        config, prompt_tokens, max_new_tokens, 0.0, 0, 1.0, prompt_lengths, stop_tokens,
        pad_id, max_len,
    )  # fmt: skip
    fn = _beam_fn(config, plan.cache_len, plan.max_new, int(num_beams), float(length_penalty),
                  early_stopping, prefill_chunk)  # fmt: skip
    return fn(
        params,
        jnp.asarray(plan.tokens),
        jnp.asarray(plan.lengths),
        jnp.asarray(plan.stop),
        jnp.int32(pad_id),
    )


__all__ = ["BeamOutput", "beam_search"]
