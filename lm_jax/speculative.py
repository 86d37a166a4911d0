"""Speculative decoding: a cheap proposer guesses k tokens, the target model checks them in one
forward, and a rejection rule keeps the output distributed exactly as the target's sampler.

Round r, per row (rows advance at their own pace; positions are per row):
1. propose d_1..d_k with proposal log-probs q_i [V]: a **draft model** (sampled with the same
   temperature / top-k / top-p as the target, its own KV cache), or **prompt lookup** (the k
   tokens that followed the latest earlier occurrence of the last n tokens, n = max_ngram..1;
   q_i is a point mass; a round where no row has a match is a plain one-token step, so text with
   nothing to copy costs one lookup per token, not a (k+1)-token forward);
2. one target forward over [t, d_1..d_k] at positions pos..pos+k gives the target's sampling
   distributions p_0..p_k (temperature, top-k, top-p applied as in `generate`);
3. accept d_i while u_i < p_{i-1}(d_i) / q_i(d_i); at the first rejection i, draw the next token
   from norm(max(0, p_{i-1} - q_i)); when all k are accepted, draw a bonus token from p_k.
   Greedy (temperature 0): accept while d_i == argmax p_{i-1}; the next token is that argmax,
   so the output equals plain greedy decoding token for token.

Leviathan et al. (2023) and Chen et al. (2023) prove step 3 leaves each token distributed as
p: `sample_logprobs` is therefore log p(token), as in `generate`, and `logprobs` the raw model's.
Rejected draft tokens leave stale cache slots beyond a row's frontier; the cache mask is causal by
position, and every slot is rewritten before a query at or after it exists (as `generate`'s pad
slots). The draft re-reads the token before `t` each round (an idempotent rewrite when it is
already cached), which covers the one draft token it never saw after a fully accepted round.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm_jax.configs.base import ModelConfig
from lm_jax.generate import CACHE_NAMES, GenerateOutput, plan_generation
from lm_jax.nn.transformer import Transformer, init_cache
from lm_jax.prefill import DEFAULT_CHUNK, check_chunk, prefill
from lm_jax.sampling import sampling_logprobs
from lm_jax.sharding import constrain

METHODS = ("draft", "ngram")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How tokens are proposed. `lookahead` k: tokens proposed per round (the target checks k + 1
    positions per forward). `method`: "draft" (a smaller model with the target's vocabulary) or
    "ngram" (prompt lookup, no second model). `max_ngram`: the longest suffix prompt lookup
    matches (it falls back to shorter ones, down to 1)."""

    lookahead: int = 4
    method: str = "draft"
    max_ngram: int = 3

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}.")
        if not 1 <= int(self.lookahead) <= 32:
            raise ValueError(f"lookahead must be in [1, 32], got {self.lookahead}.")
        if not 1 <= int(self.max_ngram) <= 8:
            raise ValueError(f"max_ngram must be in [1, 8], got {self.max_ngram}.")


class SpeculativeOutput(NamedTuple):
    output: GenerateOutput  # as `generate` returns it
    proposed: jax.Array  # [B] int32 draft tokens proposed to the row
    accepted: jax.Array  # [B] int32 of those the target accepted
    rounds: jax.Array  # [B] int32 target forwards the row took part in (after the prefill)

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens over all rows."""
        return float(jnp.sum(self.accepted)) / max(float(jnp.sum(self.proposed)), 1.0)

    @property
    def tokens_per_round(self) -> float:
        """Generated tokens per target forward (1 for plain decoding; at most k + 1)."""
        return float(jnp.sum(self.output.lengths)) / max(float(jnp.sum(self.rounds)), 1.0)


def layer_draft(config: ModelConfig, params, num_layers: int):
    """A self-draft: the target's first `num_layers` blocks with its own embeddings, final norm
    and head (no second model to train or load) -> (draft config, draft params)."""
    if not 1 <= num_layers < config.num_layers:
        raise ValueError(
            f"a layer draft needs 1 <= num_layers < the target's {config.num_layers}, got "
            f"{num_layers}."
        )
    if config.moe is not None and config.moe.every != 1:
        raise ValueError("a layer draft slices scanned blocks: MoE layer groups are not supported.")
    cfg = dataclasses.replace(config, num_layers=num_layers)
    sliced = dict(params)
    sliced["layers"] = jax.tree.map(lambda x: x[:num_layers], params["layers"])
    return cfg, sliced


# --------------------------------------------------------------------------- pure pieces


def _dists(logits, temperature, top_k: int, top_p, greedy: bool, use_top_p: bool):
    """logits [..., V] -> log-probs of the sampling distribution (greedy: a point mass)."""
    if greedy:
        V = logits.shape[-1]
        return jnp.where(jax.nn.one_hot(jnp.argmax(logits, -1), V) > 0, 0.0, -jnp.inf)
    return sampling_logprobs(logits, temperature, top_k, top_p, use_top_p)


def ngram_proposals(seq: jax.Array, pos: jax.Array, k: int, max_ngram: int):
    """Prompt lookup. seq [B, S] tokens by position, known at 0..pos [B] -> (proposals [B, k],
    found [B] bool): the tokens after the latest j with seq[j : j+n] == seq[pos-n+1 : pos+1] and
    j + n <= pos, for the largest n <= max_ngram that has a match; no match: the last token
    repeated, found False."""
    B, S = seq.shape
    idx = jnp.arange(S)
    padded = jnp.pad(seq, ((0, 0), (0, max_ngram + k)))
    best = jnp.full((B,), -1, jnp.int32)  # start of the continuation
    for n in range(1, max_ngram + 1):  # longer matches override shorter ones
        last = jnp.take_along_axis(seq, jnp.clip(pos[:, None] - n + 1 + jnp.arange(n), 0), 1)
        match = jnp.ones((B, S), bool)
        for t in range(n):
            match &= padded[:, t : t + S] == last[:, t : t + 1]
        match &= (idx[None] + n <= pos[:, None]) & (pos[:, None] - n + 1 >= 0)
        j = jnp.max(jnp.where(match, idx[None], -1), axis=1)
        best = jnp.where(j >= 0, j + n, best)
    take = jnp.clip(best[:, None] + jnp.arange(k), 0, S + max_ngram + k - 1)
    found = jnp.take_along_axis(padded, take, axis=1)
    tail = jnp.take_along_axis(seq, pos[:, None], axis=1)
    # a continuation cannot be read past the frontier: repeat the last known token there
    known = (best[:, None] >= 0) & (take <= pos[:, None])
    return jnp.where(known, found, tail).astype(jnp.int32), best >= 0


def accept_rule(key, drafts, q, p, greedy: bool):
    """drafts [B, k], proposal log-probs q [B, k, V], target log-probs p [B, k+1, V] ->
    (n accepted [B], next token [B]) by the rejection rule (module docstring, step 3)."""
    B, k = drafts.shape
    ku, kr = jax.random.split(key)
    d = drafts[..., None]
    p_d = jnp.take_along_axis(p[:, :k], d, axis=-1)[..., 0]  # [B, k]
    q_d = jnp.take_along_axis(q, d, axis=-1)[..., 0]
    if greedy:
        ok = p_d == 0.0  # the draft is the target's argmax
    else:
        u = jax.random.uniform(ku, (B, k), minval=jnp.finfo(jnp.float32).tiny)
        ok = jnp.log(u) < p_d - q_d
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B]
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
    q_n = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0)), constant_values=-jnp.inf),
                              n[:, None, None], axis=1)[:, 0]  # fmt: skip  # -inf row when n == k
    resid = jnp.maximum(jnp.exp(p_n) - jnp.exp(q_n), 0.0)
    # p == q at a rejection has probability 0; fall back to p for numerical safety
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, jnp.exp(p_n))
    if greedy:
        nxt = jnp.argmax(p_n, axis=-1)
    else:
        nxt = jax.random.categorical(kr, jnp.log(resid), axis=-1)
    return n, nxt.astype(jnp.int32)


# --------------------------------------------------------------------------- the decode program


class _State(NamedTuple):
    r: jax.Array  # round index
    tok: jax.Array  # [B] the last emitted token (not yet in the target cache)
    seq: jax.Array  # [B, S] tokens by position (prompt, then emitted)
    cache: object  # target KV cache
    dcache: object  # draft KV cache (None for prompt lookup)
    done: jax.Array  # [B] ended on a stop token
    lengths: jax.Array  # [B] tokens emitted
    tokens: jax.Array  # [B, N + k + 1]
    logprobs: jax.Array
    sample_logprobs: jax.Array
    proposed: jax.Array  # [B]
    accepted: jax.Array  # [B]
    rounds: jax.Array  # [B]


@functools.lru_cache(maxsize=16)
def _speculative_fn(
    config: ModelConfig,
    draft_config: ModelConfig | None,
    spec: SpeculativeConfig,
    cache_len: int,
    max_new: int,
    top_k: int,
    greedy: bool,
    use_top_p: bool,
    prefill_chunk: int,
):
    model = Transformer(config)
    dmodel = None if draft_config is None else Transformer(draft_config)
    k = int(spec.lookahead)
    W = k + 1  # tokens per verify window

    def run(params, dparams, tokens, lengths, key, temperature, top_p, stop, pad_id):
        B, T = tokens.shape
        S = cache_len
        dist = lambda lg: _dists(lg, temperature, top_k, top_p, greedy, use_top_p)
        tokens = constrain(tokens, ("batch", "length"))

        def fill(m, p, cfg):
            c = jax.tree.map(lambda x: constrain(x, CACHE_NAMES), init_cache(cfg, B, S))
            return prefill(m, p, tokens, c, lengths - 1, chunk=prefill_chunk)

        last, cache = fill(model, params, config)
        dcache = None if dmodel is None else fill(dmodel, dparams, draft_config)[1]
        p0 = dist(last)
        k0 = jax.random.fold_in(key, 0)
        first = (jnp.argmax(p0, -1) if greedy else jax.random.categorical(k0, p0)).astype(jnp.int32)
        seq = jnp.zeros((B, S), jnp.int32).at[:, :T].set(tokens)
        rows = jnp.arange(B)
        seq = seq.at[rows, lengths].set(first, mode="drop")
        base = jax.nn.log_softmax(last.astype(jnp.float32), -1)
        lp0 = jnp.take_along_axis(base, first[:, None], -1)[:, 0]
        slp0 = 0.0 if greedy else jnp.take_along_axis(p0, first[:, None], -1)[:, 0]
        hit0 = jnp.any(first[:, None] == stop[None, :], axis=-1)
        buf = lambda fill, dt: jnp.full((B, max_new + W), fill, dt)
        s = _State(
            r=jnp.int32(1),
            tok=first,
            seq=seq,
            cache=cache,
            dcache=dcache,
            done=hit0,
            lengths=jnp.ones((B,), jnp.int32),
            tokens=buf(pad_id, jnp.int32).at[:, 0].set(first),
            logprobs=buf(0.0, jnp.float32).at[:, 0].set(lp0),
            sample_logprobs=buf(0.0, jnp.float32).at[:, 0].set(slp0),
            proposed=jnp.zeros((B,), jnp.int32),
            accepted=jnp.zeros((B,), jnp.int32),
            rounds=jnp.zeros((B,), jnp.int32),
        )

        def cond(s: _State):
            return jnp.any(~s.done & (s.lengths < max_new))

        def propose(s: _State, pos, kd):
            """-> drafts [B, k], proposal log-probs [B, k, V], new draft cache, found [B] (a row
            has a real proposal: always for a draft model)."""
            if dmodel is None:
                d, found = ngram_proposals(s.seq, pos, k, int(spec.max_ngram))
                q = jnp.where(jax.nn.one_hot(d, config.vocab_size) > 0, 0.0, -jnp.inf)
                return d, q, None, found
            prev = jnp.take_along_axis(s.seq, (pos - 1)[:, None], axis=1)[:, 0]
            two = jnp.stack([prev, s.tok], axis=1)
            ppos = jnp.minimum(jnp.stack([pos - 1, pos], axis=1), S - 1)
            lg, dc = dmodel.apply({"params": dparams}, two, ppos, cache=s.dcache)

            def draw(q, j):
                if greedy:
                    return jnp.argmax(q, -1).astype(jnp.int32)
                return jax.random.categorical(jax.random.fold_in(kd, j), q).astype(jnp.int32)

            def step(carry, j):  # q_{j+1} from the last logits, then read d_{j+1}
                lg, dc = carry
                qj = dist(lg)
                dj = draw(qj, j)
                at = jnp.minimum(pos + 1 + j, S - 1)[:, None]
                lg2, dc = dmodel.apply({"params": dparams}, dj[:, None], at, cache=dc)
                return (lg2[:, 0], dc), (dj, qj)

            # d_k itself is not read: the next round re-reads the token before its first one
            (lg, dc), (d, q) = jax.lax.scan(step, (lg[:, 1], dc), jnp.arange(k - 1))
            qk = dist(lg)
            d = jnp.concatenate([d.T, draw(qk, k - 1)[:, None]], axis=1)
            q = jnp.concatenate([jnp.swapaxes(q, 0, 1), qk[:, None]], axis=1)
            return d, q, dc, jnp.ones((B,), bool)

        def verify(cache, tok, pos, d, q, ka):
            """One target forward over [tok, d] -> (logits [B, W, V], p, cache, n, next)."""
            window = jnp.concatenate([tok[:, None], d], axis=1)  # [B, W]
            wpos = jnp.minimum(pos[:, None] + jnp.arange(W), S - 1)
            lg, cache = model.apply({"params": params}, window, wpos, cache=cache)
            p = dist(lg)  # [B, W, V]
            n, nxt = accept_rule(ka, d, q, p, greedy)
            return lg, p, cache, n, nxt

        def plain_step(cache, tok, pos, d, q, ka):
            """No row has a proposal: a one-token forward, as `generate` (same outputs as
            `verify`, the window padded; only column 0 is emitted)."""
            lg, cache = model.apply({"params": params}, tok[:, None], pos[:, None], cache=cache)
            p = dist(lg)  # [B, 1, V]
            nxt = jnp.argmax(p[:, 0], -1) if greedy else jax.random.categorical(ka, p[:, 0])
            pad = ((0, 0), (0, k), (0, 0))
            n = jnp.zeros((B,), jnp.int32)
            return jnp.pad(lg, pad), jnp.pad(p, pad), cache, n, nxt.astype(jnp.int32)

        def body(s: _State) -> _State:
            active = ~s.done & (s.lengths < max_new)
            pos = lengths + s.lengths - 1  # [B] position of s.tok
            kr = jax.random.fold_in(key, s.r)
            kd, ka = jax.random.split(kr)
            d, q, dc, found = propose(s, pos, kd)
            args = (s.cache, s.tok, pos, d, q, ka)
            if dmodel is None:  # prompt lookup: skip the k-token window when nothing matched
                checked = jnp.any(found & active)
                lg, p, cache, n, nxt = jax.lax.cond(checked, verify, plain_step, *args)
            else:
                checked = jnp.bool_(True)
                lg, p, cache, n, nxt = verify(*args)
            j = jnp.arange(W)[None]
            emit = jnp.where(j < n[:, None], jnp.pad(d, ((0, 0), (0, 1))), nxt[:, None])
            count = n + 1
            is_stop = jnp.any(emit[..., None] == stop[None, None, :], axis=-1)
            stop_at = is_stop & (j < count[:, None])
            stopped = jnp.any(stop_at, axis=1)
            count = jnp.where(stopped, jnp.argmax(stop_at, axis=1) + 1, count)
            count = jnp.where(active, jnp.minimum(count, max_new - s.lengths), 0)
            keep = j < count[:, None]
            base = jax.nn.log_softmax(lg.astype(jnp.float32), -1)
            lp = jnp.take_along_axis(base, emit[..., None], -1)[..., 0]
            slp = 0.0 if greedy else jnp.take_along_axis(p, emit[..., None], -1)[..., 0]
            put = jax.vmap(lambda b, w, i: jax.lax.dynamic_update_slice(b, w, (i,)))
            at = s.lengths
            seq_pos = jnp.where(keep, pos[:, None] + 1 + j, S)  # S: dropped
            last = jnp.take_along_axis(emit, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0]
            return _State(
                r=s.r + 1,
                tok=jnp.where(count > 0, last, s.tok),
                seq=s.seq.at[jnp.arange(B)[:, None], seq_pos].set(emit, mode="drop"),
                cache=cache,
                dcache=dc,
                done=s.done | (active & stopped & (jnp.argmax(stop_at, axis=1) < count)),
                lengths=s.lengths + count,
                tokens=put(s.tokens, jnp.where(keep, emit, pad_id), at),
                logprobs=put(s.logprobs, jnp.where(keep, lp, 0.0), at),
                sample_logprobs=put(s.sample_logprobs, jnp.where(keep, slp, 0.0), at),
                proposed=s.proposed + k * (active & checked),
                accepted=s.accepted + jnp.where(active, n, 0),
                rounds=s.rounds + active,
            )

        s = jax.lax.while_loop(cond, body, s)
        out = GenerateOutput(
            s.tokens[:, :max_new],
            s.logprobs[:, :max_new],
            s.sample_logprobs[:, :max_new],
            s.lengths,
            s.done,
        )
        return SpeculativeOutput(out, s.proposed, s.accepted, s.rounds)

    return jax.jit(run)


def speculative_generate(
    config: ModelConfig,
    params,
    prompt_tokens,
    key: jax.Array,
    max_new_tokens: int,
    spec: SpeculativeConfig = SpeculativeConfig(),
    draft_config: ModelConfig | None = None,
    draft_params=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prompt_lengths=None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    max_len: int | None = None,
    prefill_chunk: int = DEFAULT_CHUNK,
) -> SpeculativeOutput:
    """`generate` with speculation (module docstring): same arguments and output, plus the
    draft's proposal and acceptance counts. spec.method "draft" needs `draft_config` and
    `draft_params` (same vocabulary; e.g. `layer_draft`); "ngram" needs neither."""
    spec.check()
    prefill_chunk = check_chunk(prefill_chunk)
    if spec.method == "draft":
        if draft_config is None or draft_params is None:
            raise ValueError(
                "speculative method 'draft' needs draft_config and draft_params (e.g. from "
                "layer_draft(config, params, n)); or use method='ngram' (prompt lookup)."
            )
        if draft_config.vocab_size != config.vocab_size:
            raise ValueError(
                f"the draft's vocab_size {draft_config.vocab_size} differs from the target's "
                f"{config.vocab_size}: the draft must share the target's tokenizer."
            )
    else:
        draft_config, draft_params = None, None
    plan = plan_generation(
        config,
        prompt_tokens,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        prompt_lengths,
        stop_tokens,
        pad_id,
        max_len,
        headroom=int(spec.lookahead) + 1,
    )
    if draft_config is not None and draft_config.position == "learned":
        if plan.cache_len > draft_config.max_len:
            raise ValueError(
                f"the draft has {draft_config.max_len} learned positions but this request needs "
                f"{plan.cache_len}; lower max_new_tokens or use a longer draft."
            )
    if plan.max_new == 0:
        zi = jnp.zeros((plan.tokens.shape[0],), jnp.int32)
        return SpeculativeOutput(plan.empty_output(), zi, zi, zi)
    fn = _speculative_fn(
        config,
        draft_config,
        spec,
        plan.cache_len,
        plan.max_new,
        plan.top_k,
        plan.greedy,
        plan.use_top_p,
        prefill_chunk,
    )
    return fn(params, draft_params, *plan.inputs(key, temperature, top_p, pad_id))
