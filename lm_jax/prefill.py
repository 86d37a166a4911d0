"""Prefill: run prompts through the model into a KV cache, in chunks, and return only the logits
the sampler needs.

Every decode loop (generate, beam search, speculative decoding, the serving engine) starts the
same way: write the prompt's keys and values into the cache and take the logits at each row's
last prompt position. Two things make that cheaper than one full forward pass:

- **Only the last position goes through the LM head.** The model runs with `skip_head=True`
  ([B, T, D] final-norm activations), the row's last position is gathered, and
  `head_logits_fn` maps it to [B, V]. A full forward would compute [B, T, V] float32 logits and
  keep one row of them: for a 262k-token vocabulary (Gemma 3) that head is most of a prefill's
  FLOPs and a [T, 262144] f32 buffer per prompt.
- **Chunked prefill.** With `chunk` = C > 0 and T > C, the prompt goes through in windows of C
  tokens at positions start..start+C-1, each attending over the cache written so far, so the
  attention scores are [B, N, C, S] and the activations [B, C, ...] instead of T-sized. All
  windows have the same shape (one `lax.scan`): the last one starts at T - C and so overlaps
  the one before it; the overlapped tokens are recomputed from the same inputs and write the
  same keys and values again. The result equals an unchunked prefill up to float rounding for
  dense models and dropless MoE; capacity-limited MoE routes each window's tokens on their
  own, as one-token decode steps already do.

Prefix embeddings (a captioner's image tokens) go through unchunked, with the prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.nn.attention import RingCache
from lm_jax.nn.transformer import Transformer, head_logits_fn

DEFAULT_CHUNK = 512  # tokens per prefill window (0 = the whole prompt at once)


def check_chunk(chunk: int) -> int:
    """The chunk size as an int; ValueError naming the fix for a negative one."""
    if int(chunk) < 0:
        raise ValueError(f"prefill_chunk must be >= 0 (0 = the whole prompt at once), got {chunk}.")
    return int(chunk)


def window_starts(length: int, chunk: int) -> np.ndarray:
    """Start offsets of the C-token windows covering [0, length): 0, C, 2C, ... and the last at
    length - C (overlapping its neighbour when C does not divide length). [1] = [0] when one
    window (or no chunking) covers it all."""
    if chunk <= 0 or length <= chunk:
        return np.zeros((1,), np.int32)
    n = -(-length // chunk)
    starts = np.minimum(np.arange(n) * chunk, length - chunk)
    return starts.astype(np.int32)


def tokens_per_call(length: int, chunk: int, prefix: int | None = None) -> int:
    """The most cache slots one `prefill` call writes for a [B, length] prompt (after `prefix`
    embeddings: one window of prefix + length); what a ring-buffer cache must hold beside the
    window (`lm_jax.nn.transformer.ring_cache_len`)."""
    if prefix is not None:
        return prefix + length
    return length if len(window_starts(length, chunk)) == 1 else chunk


def prefill(
    model: Transformer, params, tokens, cache, last, prefix=None, chunk: int = 0, variables=None
):
    """Write prompts into `cache` and return (logits [B, V] float32 at position `last`, cache).

    tokens [B, T] int32 at positions 0..T-1 (after the P prefix embeddings [B, P, D] when given:
    positions P..P+T-1), `last` [B] int32 the position to take logits at (prefix included),
    `cache` from `init_cache`. `chunk` > 0: windows of that many tokens (module docstring).
    `last` must lie in [0, P + T): callers derive it from checked prompt lengths. `variables`:
    more collections for `model.apply` beside the params (e.g. per-row adapters, `lora_rows`)."""
    cfg = model.cfg
    B, T = tokens.shape
    chunk = check_chunk(chunk)
    starts = window_starts(T, 0 if prefix is not None else chunk)
    C = T if len(starts) == 1 else chunk

    def run(cache, start, toks, prefix):
        P = 0 if prefix is None else prefix.shape[1]
        pos = jnp.broadcast_to(start + jnp.arange(P + C, dtype=jnp.int32), (B, P + C))
        # a ring-buffer cache must not take the padding past a row's prompt (it would displace
        # the row's own keys): segment 0 there; the full cache overwrites it before any read
        seg = (pos <= last[:, None]).astype(jnp.int32) if isinstance(cache, RingCache) else None
        h, cache = model.apply(
            {"params": params, **(variables or {})}, toks, pos, segment_ids=seg, cache=cache,
            skip_head=True, prefix_embeds=prefix,
        )
        idx = last - start  # [B]: the row's last position inside this window
        inside = (idx >= 0) & (idx < P + C)
        got = jnp.take_along_axis(h, jnp.clip(idx, 0, P + C - 1)[:, None, None], axis=1)[:, 0]
        return cache, got.astype(jnp.float32), inside  # the head casts back (exact)

    if len(starts) == 1:
        cache, h_last, _ = run(cache, jnp.int32(0), tokens, prefix)
    else:

        def body(carry, start):
            cache, h_last = carry
            toks = jax.lax.dynamic_slice_in_dim(tokens, start, C, axis=1)
            cache, got, inside = run(cache, start, toks, None)
            return (cache, jnp.where(inside[:, None], got, h_last)), None

        h0 = jnp.zeros((B, cfg.d_model), jnp.float32)
        (cache, h_last), _ = jax.lax.scan(body, (cache, h0), jnp.asarray(starts))
    logits = head_logits_fn(params, cfg)(h_last[:, None])[:, 0]  # [B, V]
    return logits, cache
