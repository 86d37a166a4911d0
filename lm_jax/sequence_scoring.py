"""Log-probabilities of given sequences and continuations under a decoder, through the one
scorer (`lm_jax.scoring.jitted_score`): the scoring side of `generate` (e.g. log a(x) of policy
samples under a base model, multiple-choice options, label scores)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.prompts import check_ids, prepare_prompts
from lm_jax.scoring import jitted_score


def sequence_logprobs(
    config: ModelConfig,
    params,
    tokens,
    lengths=None,
    mask=None,
    prompt_lengths=None,
    chunk: int = 0,
) -> jax.Array:
    """Per-token log-probs [B, T] of given sequences in one forward pass (temperature 1), by
    `lm_jax.scoring` (`chunk` > 0: the head `chunk` positions at a time).

    out[b, t] = log p(tokens[b, t] | tokens[b, :t]) where t >= 1, t < lengths[b] (default T),
    t >= prompt_lengths[b] (default 1) and mask[b, t] (default all); 0 elsewhere. Summing a row
    gives log p(continuation | prompt). Tokens past `lengths` are ignored (any value).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}.")
    B, T = tokens.shape
    if T > config.max_len:
        raise ValueError(
            f"sequence of {T} tokens is longer than the maximum length {config.max_len}."
        )
    t = np.arange(T)[None]
    lengths = np.full((B,), T) if lengths is None else np.asarray(lengths).reshape(B)
    ctx = t < lengths[:, None]
    check_ids(tokens[ctx], config.vocab_size, "tokens")
    start = np.ones((B,)) if prompt_lengths is None else np.asarray(prompt_lengths).reshape(B)
    scored = ctx & (t >= np.maximum(start, 1)[:, None])
    if mask is not None:
        scored &= np.asarray(mask).astype(bool)
    tokens = np.where(ctx, tokens, 0).astype(np.int32)
    if T < 2:
        return jnp.zeros((B, T), jnp.float32)
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "loss_mask": jnp.asarray(scored[:, 1:], jnp.float32),
    }
    tok = jitted_score(config, chunk)(params, batch).token_logprobs  # [B, T - 1]
    return jnp.concatenate([jnp.zeros((B, 1), tok.dtype), tok], axis=1)


def continuation_logprobs(
    config: ModelConfig,
    params,
    prompt_tokens,
    continuations,
    lengths=None,
    prompt_lengths=None,
) -> jax.Array:
    """log p(continuation token | prompt, earlier continuation) [B, N], laid out as
    `GenerateOutput.tokens` (0 at j >= lengths[b]); e.g. log a(x) of policy samples under a
    base model. prompt_tokens as in `generate`; continuations [B, N] with `lengths` [B], or
    ragged lists."""
    ptoks, plens = prepare_prompts(prompt_tokens, prompt_lengths, config.vocab_size)
    if isinstance(continuations, (list, tuple)) and lengths is None:  # ragged lists
        rows = [np.asarray(r, np.int64).reshape(-1) for r in continuations]
        lengths = [len(r) for r in rows]
        cont = np.zeros((len(rows), max(lengths, default=0)), np.int64)
        for b, r in enumerate(rows):
            cont[b, : len(r)] = r
    else:
        cont = np.asarray(continuations)
    B, N = cont.shape
    if B != ptoks.shape[0]:
        raise ValueError(f"{ptoks.shape[0]} prompts but {B} continuations.")
    clens = np.full((B,), N) if lengths is None else np.asarray(lengths).reshape(B)
    total = plens + clens
    seq = np.zeros((B, int(total.max())), np.int64)
    for b in range(B):
        seq[b, : plens[b]] = ptoks[b, : plens[b]]
        seq[b, plens[b] : total[b]] = cont[b, : clens[b]]
    out = sequence_logprobs(config, params, seq, total, prompt_lengths=plens)
    idx = np.minimum(plens[:, None] + np.arange(N)[None], seq.shape[1] - 1)
    got = jnp.take_along_axis(out, jnp.asarray(idx), axis=1)
    return jnp.where(jnp.asarray(np.arange(N)[None] < clens[:, None]), got, 0.0)
