"""Beam search for decoder LMs (on the sampler's prompt plan, prefill and KV cache) and for
T5-family encoder-decoders (`seq2seq_beam_search`: the encoder once, cached cross-attention).

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
from lm_jax.configs.t5 import T5Config
from lm_jax.generate import CACHE_NAMES, plan_generation
from lm_jax.nn.t5 import T5, DecodeCache
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


def _search(first_logits, cache, advance, *, B: int, nb: int, N: int, stop, pad_id,
            length_penalty: float, early_stopping) -> BeamOutput:  # fmt: skip
    """The search of the module docstring over `B * nb` rows. `first_logits` [B * nb, V]: the
    next-token logits after each prompt (its rows repeated per beam); `advance(cache, rows,
    tokens, i)` gathers the cache rows `rows` [B * nb] (the continuing beams' parents), feeds
    `tokens` [B * nb] (generated position i) and returns (logits [B * nb, V], cache)."""
    keep = 2 * nb  # HF: max(2, 1 + number of eos ids) * num_beams; the stop list is one set here
    first = jnp.zeros((B, nb), jnp.float32).at[:, 1:].set(NEG)  # step 0: beam 0 only
    s0 = _Beams(
        i=jnp.int32(0), logits=first_logits.astype(jnp.float32), cache=cache,
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
        lg, cache = advance(s.cache, rows, _gather(tok, nxt).reshape(-1), s.i)
        return _Beams(
            i=s.i + 1, logits=lg.astype(jnp.float32), cache=cache,
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


def check_beam_args(num_beams, early_stopping, max_new_tokens, vocab_size: int) -> None:
    if int(num_beams) < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
    if int(max_new_tokens) < 1:
        raise ValueError(f"beam search needs max_new_tokens >= 1, got {max_new_tokens}.")
    if int(num_beams) * 2 > vocab_size:
        raise ValueError(
            f"num_beams={num_beams} keeps {2 * num_beams} candidates a step, more than the "
            f"vocabulary of {vocab_size}: lower num_beams."
        )


@functools.lru_cache(maxsize=16)
def _beam_fn(config: ModelConfig, cache_len: int, max_new: int, num_beams: int,
             length_penalty: float, early_stopping, prefill_chunk: int):  # fmt: skip
    model = Transformer(config)
    nb, N = num_beams, max_new

    def run(params, tokens, lengths, stop, pad_id):
        B = tokens.shape[0]
        cache = init_cache(config, B, cache_len)
        cache = jax.tree.map(lambda c: constrain(c, CACHE_NAMES), cache)
        last, cache = prefill(model, params, tokens, cache, lengths - 1, chunk=prefill_chunk)
        cache = jax.tree.map(lambda c: jnp.repeat(c, nb, axis=1), cache)  # [L, B * nb, ...]
        row_lengths = jnp.repeat(lengths, nb, axis=0)

        def advance(cache, rows, tok, i):
            cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=1), cache)
            pos = (row_lengths + i)[:, None]
            lg, cache = model.apply({"params": params}, tok[:, None], pos, cache=cache)
            return lg[:, 0], cache

        return _search(jnp.repeat(last, nb, axis=0), cache, advance, B=B, nb=nb, N=N,
                       stop=stop, pad_id=pad_id, length_penalty=length_penalty,
                       early_stopping=early_stopping)  # fmt: skip

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
    check_beam_args(num_beams, early_stopping, max_new_tokens, config.vocab_size)
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


@functools.lru_cache(maxsize=16)
def _seq2seq_beam_fn(cfg: T5Config, max_new: int, num_beams: int, length_penalty: float,
                     early_stopping):  # fmt: skip
    model = T5(cfg)
    nb = num_beams

    def run(params, source, source_mask, stop, pad_id):
        B, S = source.shape
        p = {"params": params}
        enc = model.apply(p, source, source_mask, method=T5.encode)
        start = jnp.full((B, 1), cfg.decoder_start_token_id, jnp.int32)
        logits, cache = model.apply(p, start, model.init_cache(B, S, enc.dtype), source_mask,
                                    enc, method=T5.decode_step)  # fmt: skip
        rep = lambda c: jnp.repeat(c, nb, axis=1)  # noqa: E731  [L, B * nb, ...]
        cache = DecodeCache(rep(cache.k), rep(cache.v), rep(cache.cross_k), rep(cache.cross_v),
                            cache.index)  # fmt: skip
        row_mask = jnp.repeat(source_mask, nb, axis=0)

        def advance(cache, rows, tok, i):
            take = lambda c: jnp.take(c, rows, axis=1)  # noqa: E731
            cache = DecodeCache(take(cache.k), take(cache.v), take(cache.cross_k),
                                take(cache.cross_v), cache.index)  # fmt: skip
            return model.apply(p, tok[:, None], cache, row_mask, method=T5.decode_step)

        return _search(jnp.repeat(logits, nb, axis=0), cache, advance, B=B, nb=nb, N=max_new,
                       stop=stop, pad_id=pad_id, length_penalty=length_penalty,
                       early_stopping=early_stopping)  # fmt: skip

    return jax.jit(run)


def seq2seq_beam_search(
    cfg: T5Config,
    params,
    source,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    source_mask=None,
    stop_tokens: Sequence[int] | None = None,
    pad_id: int | None = None,
) -> BeamOutput:
    """Beam search of an encoder-decoder (`lm_jax.nn.t5.T5`) from its decoder start token:
    source [B, S] ids, source_mask [B, S] (1 = token; default all). The encoder runs once;
    the cross-attention keys / values are computed once per source and copied to its beams.
    Tokens come without the start token; stop_tokens default to the EOS id; the search is
    HF's (module docstring), so `generate(num_beams=...)` on the same T5 gives the same ids.
    num_beams=1 is greedy decoding."""
    check_beam_args(num_beams, early_stopping, max_new_tokens, cfg.model.vocab_size)
    if int(max_new_tokens) > cfg.model.max_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is past the decoder cache of model.max_len="
            f"{cfg.model.max_len} positions: lower it or raise model.max_len."
        )
    source = jnp.asarray(source, jnp.int32)
    if source.ndim != 2:
        raise ValueError(f"source must be [batch, length] token ids, got shape {source.shape}.")
    mask = jnp.ones_like(source) if source_mask is None else jnp.asarray(source_mask, jnp.int32)
    stop = (cfg.eos_token_id,) if stop_tokens is None else tuple(stop_tokens)
    fn = _seq2seq_beam_fn(cfg, int(max_new_tokens), int(num_beams), float(length_penalty),
                          early_stopping)  # fmt: skip
    pad = cfg.pad_token_id if pad_id is None else int(pad_id)
    return fn(params, source, mask, jnp.asarray(stop or (-1,), jnp.int32), jnp.int32(pad))


__all__ = ["BeamOutput", "beam_search", "seq2seq_beam_search"]
