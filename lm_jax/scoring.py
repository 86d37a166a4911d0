"""The one scorer: log-probabilities of given target tokens under a decoder LM.

Every forward-and-score in lm_jax goes through here: perplexity / bits per byte
(`lm_jax.eval.perplexity`), option and label scoring (`lm_jax.eval.classification`,
`lm_jax.train.finetune.label_logliks` / `completion_loss`),
`lm_jax.sequence_scoring.sequence_logprobs` and the alignment policies' log pi(x)
(`lm_jax.align.policies.sequence_logprob`).

A batch is {inputs [B, T], targets [B, T], loss_mask [B, T], positions?, segment_ids?}: position
t predicts targets[b, t] from inputs[b, :t + 1]. `score` returns `Scores`:

  token_logprobs [B, T]  log p(targets[b, t]) where loss_mask > 0, else 0
  sums [B]               sum_t token_logprobs * loss_mask  (log p(continuation | context))
  counts [B]             sum_t loss_mask
  candidates [B, K]      with candidate ids [K] or [B, K]: sum over masked positions of
                         log p(candidate k) (single-token label scoring: mask one position)
  greedy [B]             1.0 where every masked target is a most likely token (greedy decoding
                         would produce the continuation; lm-eval's `is_greedy`), else 0.0

Layers, by use:
  `score(cfg, params, batch, chunk=, candidates=)`  pure and differentiable (jit it, take
      gradients through it inside a loss; LoRA params work as in `Transformer`);
  `score_after_context(cfg, params, context, owner, rows)`  continuations that share
      contexts (multiple choice): each context runs once, into a KV cache, and its
      continuations run over it; same numbers as `score` on the concatenated rows;
  `jitted_score(cfg, chunk)`  the one jit cache, keyed by the model config (and chunk);
  `Scorer(cfg, params, mesh, chunk=)`  host-side batches: parameters placed on the mesh by
      `params_shardings`, rows padded to a multiple of the data-parallel size and split over the
      data axes (`batch_sharding`), results returned as float64 numpy trimmed to the real rows.

`chunk` > 0 runs the LM head and log-softmax `chunk` positions at a time (scan + remat,
`lm_jax.losses.chunked_token_log_probs`), so [B, T, V] logits never exist at once.

`token_byte_lengths` is the one UTF-8 byte count per token id behind bits per byte (pretraining
evaluation and `lm_jax.eval`).

Nothing in `lm_jax.nn` imports this module.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.data.gguf_tokenizer import bytes_to_unicode
from lm_jax.errors import EvalError
from lm_jax.losses import chunked_token_log_probs, token_log_probs
from lm_jax.nn.transformer import Transformer, head_logits_fn, init_cache
from lm_jax.sharding import batch_sharding, params_shardings, replicated

# (params, inputs [B,T], positions [B,T], segment_ids [B,T]) -> logits [B,T,V]
LogitsFn = Callable


class Scores(NamedTuple):
    """Per-token and per-row log-probabilities of a batch's targets (module docstring)."""

    token_logprobs: jax.Array  # [B, T]
    sums: jax.Array  # [B]
    counts: jax.Array  # [B]
    candidates: jax.Array | None = None  # [B, K]
    greedy: jax.Array | None = None  # [B]


# --------------------------------------------------------------------------- pure functions


def _candidate_ids(candidates, B: int):
    if candidates is None:
        return None
    candidates = jnp.asarray(candidates, jnp.int32)
    return jnp.broadcast_to(candidates, (B, candidates.shape[-1]))


def reduce_scores(tok, cand, loss_mask, is_max=None) -> Scores:
    """`Scores` from per-position log-probs: tok [B, T] (and cand [B, T, K], is_max [B, T])
    under `loss_mask`.

    Unmasked positions may hold anything (padding: garbage targets, NaN); they read as 0.
    """
    mask = loss_mask.astype(jnp.float32)
    tok = jnp.where(mask > 0, tok, 0.0)
    sums, counts = jnp.sum(tok * mask, axis=1), jnp.sum(mask, axis=1)
    if cand is not None:
        cand = jnp.sum(jnp.where(mask[..., None] > 0, cand, 0.0) * mask[..., None], axis=1)
    greedy = None
    if is_max is not None:
        greedy = jnp.all(jnp.where(mask > 0, is_max, True), axis=1).astype(jnp.float32)
    return Scores(tok, sums, counts, cand, greedy)


def score_logits(logits, targets, loss_mask, candidates=None) -> Scores:
    """`Scores` from given logits [B, T, V] (any model's)."""
    cand = _candidate_ids(candidates, logits.shape[0])
    tok, cand_lp, is_max = token_log_probs(logits, targets, cand, greedy=True)
    return reduce_scores(tok, cand_lp, loss_mask, is_max)


def score(
    cfg: ModelConfig,
    params,
    batch: dict,
    *,
    chunk: int = 0,
    candidates=None,
    deterministic: bool = True,
    rngs: dict | None = None,
    temperature: float = 1.0,
) -> Scores:
    """`Scores` of `batch` under `Transformer(cfg)` with `params` (pure: jit / grad it).

    `positions` / `segment_ids` default as in `Transformer`; `loss_mask` defaults to all ones.
    `chunk` > 0: the head runs `chunk` positions at a time (no [B, T, V] logits).
    `temperature` != 1: log-probs of softmax(logits / temperature) (the distribution sampled
    at that temperature; GRPO's ratios and KL, as TRL computes them).
    """
    inputs, targets = batch["inputs"], batch["targets"]
    mask = batch.get("loss_mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask
    out = Transformer(cfg).apply(
        {"params": params},
        inputs,
        batch.get("positions"),
        batch.get("segment_ids"),
        deterministic=deterministic,
        skip_head=chunk > 0,
        rngs=rngs,
    )
    cand = _candidate_ids(candidates, inputs.shape[0])
    scaled = temperature != 1.0
    if chunk > 0:  # out: final-norm activations [B, T, D]
        head = head_logits_fn(params, cfg)
        if scaled:
            head = lambda h, _f=head: _f(h).astype(jnp.float32) / temperature  # noqa: E731
        res = chunked_token_log_probs(out, head, targets, chunk, cand, greedy=True)
    else:  # out: logits [B, T, V]
        if scaled:
            out = out.astype(jnp.float32) / temperature
        res = token_log_probs(out, targets, cand, greedy=True)
    tok, cand_lp, is_max = res
    return reduce_scores(tok, cand_lp, mask, is_max)


def score_after_context(
    cfg: ModelConfig, params, context, owner, rows: dict, *, chunk: int = 0
) -> Scores:
    """`Scores` of continuation rows that each extend one of a few shared contexts.

    A multiple-choice document asks for log p(choice_k | context) for every k: the context
    goes through the model once here, into a KV cache, and each choice then runs over that
    cache, so a K-choice document costs one context pass, not K, and the LM head runs on the
    choices' positions only.

    context [C, Tc] int32: each context's tokens except its last, right-padded (any id);
    owner [R] int32: the context row that continuation row r extends;
    rows {inputs, targets, loss_mask, positions} [R, Tn]: row r's inputs are its context's last
    token followed by the continuation but its last token, at positions len(context) - 1
    onwards; targets are the continuation. Returns Scores over [R, Tn].

    Equal to `score` of the concatenated (context + continuation) rows: a cached key is read
    only by queries at later positions, a context's padding sits at positions its
    continuations overwrite before attending, and the cache holds Tc + Tn positions.
    """
    model = Transformer(cfg)
    C, Tc = context.shape
    R, Tn = rows["inputs"].shape
    cache = init_cache(cfg, C, Tc + Tn)
    pos = jnp.broadcast_to(jnp.arange(Tc, dtype=jnp.int32), (C, Tc))
    _, cache = model.apply({"params": params}, context, pos, cache=cache, skip_head=True)
    cache = jax.tree.map(lambda c: jnp.take(c, owner, axis=1), cache)  # [L, R, S, K, H]
    h, _ = model.apply(
        {"params": params}, rows["inputs"], rows["positions"], cache=cache, skip_head=True
    )
    head = head_logits_fn(params, cfg)
    if chunk > 0:
        res = chunked_token_log_probs(h, head, rows["targets"], chunk, greedy=True)
    else:
        res = token_log_probs(head(h), rows["targets"], greedy=True)
    tok, _, is_max = res
    return reduce_scores(tok, None, rows["loss_mask"], is_max)


@functools.lru_cache(maxsize=16)
def jitted_score_after_context(cfg: ModelConfig, chunk: int = 0):
    """jit(score_after_context) for `cfg`: fn(params, context, owner, rows) -> Scores."""
    return jax.jit(functools.partial(score_after_context, cfg, chunk=chunk))


@functools.lru_cache(maxsize=16)
def jitted_score(cfg: ModelConfig, chunk: int = 0):
    """jit(score) for `cfg`: fn(params, batch, candidates=None) -> Scores (one cache)."""
    check_chunk(chunk)

    def fn(params, batch, candidates=None):
        return score(cfg, params, batch, chunk=chunk, candidates=candidates)

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _jitted_logits_score(logits_fn: LogitsFn):
    def fn(params, batch, candidates=None):
        logits = logits_fn(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        return score_logits(logits, batch["targets"], batch["loss_mask"], candidates)

    return jax.jit(fn)


# Logits a scoring call may hold at once ([rows, positions, vocab] float32); past it the head
# runs in chunks of positions (`chunked_token_log_probs`, the same numbers).
LOGITS_BUDGET_BYTES = 1 << 30


def head_chunk(chunk: int, rows: int, positions: int, vocab: int,
               budget: int | None = None) -> int:  # fmt: skip
    """`chunk` if set (> 0); else 0 (the whole head at once) when [rows, positions, vocab] f32
    logits fit `budget` (default `LOGITS_BUDGET_BYTES`), or the largest power of two of
    positions that does (at least 1)."""
    budget = LOGITS_BUDGET_BYTES if budget is None else budget
    if chunk or rows * positions * vocab * 4 <= budget:
        return chunk
    fit = max(1, budget // (rows * vocab * 4))
    return 1 << (fit.bit_length() - 1)


def check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or chunk < 0:
        raise EvalError(f"chunk must be an int >= 0 (0 = the whole head at once), got {chunk!r}")


# --------------------------------------------------------------------------- host-side batches


def data_parallel_size(mesh) -> int:
    if mesh is None:
        return 1
    return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]


def complete_batch(batch: dict) -> dict:
    """numpy copies of the model keys, with default positions/segments/mask filled in."""
    if "inputs" not in batch or "targets" not in batch:
        raise EvalError(f"a batch needs 'inputs' and 'targets', got keys {sorted(batch)}")
    inputs = np.asarray(batch["inputs"], np.int32)
    targets = np.asarray(batch["targets"], np.int32)
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise EvalError(
            f"inputs and targets must both be [B, T], got {inputs.shape} and {targets.shape}"
        )
    B, T = inputs.shape
    out = {"inputs": inputs, "targets": targets}
    out["positions"] = np.asarray(
        batch.get("positions", np.broadcast_to(np.arange(T), (B, T))), np.int32
    )
    out["segment_ids"] = np.asarray(batch.get("segment_ids", np.ones((B, T))), np.int32)
    out["loss_mask"] = np.asarray(batch.get("loss_mask", np.ones((B, T))), np.float32)
    return out


def _abstract_params(cfg: ModelConfig):
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    return jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens)["params"], jax.random.key(0))


class Scorer:
    """Scores host batches {inputs, targets, positions?, segment_ids?, loss_mask?}.

    With `mesh`, parameters are placed by `lm_jax.sharding.params_shardings` and the batch is
    split over the data axes (rows padded to a multiple of their size with masked rows).
    `logits_fn` replaces the Transformer (any function of ids giving logits; params replicated).
    `chunk` > 0: the Transformer's head runs `chunk` positions at a time (same numbers);
    0: all at once unless a call's logits would pass `LOGITS_BUDGET_BYTES` (`head_chunk`).
    """

    def __init__(
        self,
        cfg: ModelConfig | None,
        params,
        mesh=None,
        logits_fn: LogitsFn | None = None,
        chunk: int = 0,
    ):
        if logits_fn is None and cfg is None:
            raise EvalError("Scorer needs a ModelConfig (or an explicit logits_fn)")
        check_chunk(chunk)
        if chunk and logits_fn is not None:
            raise EvalError("chunk applies to the Transformer's head only, not to a logits_fn")
        self.cfg, self.mesh, self.chunk, self.logits_fn = cfg, mesh, chunk, logits_fn
        params = nn.unbox(params)
        self.fn = jitted_score(cfg, chunk) if logits_fn is None else _jitted_logits_score(logits_fn)
        if mesh is not None:
            if logits_fn is None:
                shardings = params_shardings(_abstract_params(cfg), mesh)
            else:
                shardings = jax.tree.map(lambda _: replicated(mesh), params)
            params = jax.device_put(params, shardings)
        self.params = params

    def score(self, batch: dict, candidates=None) -> Scores:
        """`Scores` of one batch as float64 numpy; `candidates` [K] or [B, K] token ids."""
        batch = complete_batch(batch)
        B = batch["inputs"].shape[0]
        if self.cfg is not None and batch["positions"].size:
            hi = int(batch["positions"].max())
            if hi >= self.cfg.max_len:
                raise EvalError(
                    f"a row reaches position {hi} but the model's max_len is {self.cfg.max_len}: "
                    "use a shorter window / seq_len"
                )
        if candidates is not None:
            candidates = np.asarray(candidates, np.int32)
            batch["candidates"] = np.broadcast_to(candidates, (B, candidates.shape[-1]))
        batch = self._place(batch)
        cand = batch.pop("candidates", None)
        fn = self.fn
        if self.cfg is not None and self.logits_fn is None:
            rows, T = batch["inputs"].shape
            chunk = head_chunk(self.chunk, rows, T, self.cfg.vocab_size)
            fn = jitted_score(self.cfg, chunk) if chunk != self.chunk else fn
        out = self._run(fn, batch, cand)
        return Scores(*(None if x is None else np.asarray(x, np.float64)[:B] for x in out))

    @property
    def shares_contexts(self) -> bool:
        """Whether `score_after_context` applies: a Transformer whose tokens meet only in
        attention (capacity-limited MoE routes the tokens of one call together)."""
        cfg = self.cfg
        return cfg is not None and (cfg.moe is None or cfg.moe.dispatch == "dropless")

    def score_after_context(self, context, owner, rows: dict) -> Scores:
        """`score_after_context` (the pure function's shapes) on host arrays; Scores [R, Tn]."""
        if not self.shares_contexts:
            raise EvalError("shared-context scoring needs a dense or dropless-MoE Transformer")
        context, owner = np.asarray(context, np.int32), np.asarray(owner, np.int32)
        rows = complete_batch(rows)
        R, Tn = rows["inputs"].shape
        S = context.shape[1] + Tn
        if S > self.cfg.max_len or int(rows["positions"].max()) >= S:
            raise EvalError(
                f"contexts of {context.shape[1]} + continuations of {Tn} tokens exceed the "
                f"model's max_len {self.cfg.max_len} (or rows sit past them): score them whole"
            )
        if owner.shape != (R,) or owner.min() < 0 or owner.max() >= context.shape[0]:
            raise EvalError(f"owner must be [R={R}] indices into {context.shape[0]} contexts")
        del rows["segment_ids"]
        ctx = self._place({"ids": context})["ids"]
        placed = self._place({**rows, "owner": owner})
        owner = placed.pop("owner")
        chunk = head_chunk(self.chunk, owner.shape[0], Tn, self.cfg.vocab_size)
        out = self._run(jitted_score_after_context(self.cfg, chunk), ctx, owner, placed)
        return Scores(*(None if x is None else np.asarray(x, np.float64)[:R] for x in out))

    def _place(self, arrays: dict) -> dict:
        """Rows padded (zeros) to a multiple of the data-parallel size, split over the mesh."""
        n = next(iter(arrays.values())).shape[0]
        pad = (-n) % data_parallel_size(self.mesh)
        if pad:
            arrays = {
                k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                for k, v in arrays.items()
            }
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        return {
            k: jax.device_put(v, batch_sharding(self.mesh, v.ndim, n + pad))
            for k, v in arrays.items()
        }

    def _run(self, fn, *args):
        if self.mesh is None:
            out = fn(self.params, *args)
        else:
            with jax.set_mesh(self.mesh):
                out = fn(self.params, *args)
        return jax.device_get(out)

    def row_sums(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        """(nll [B], tokens [B]) float64 for one batch."""
        s = self.score(batch)
        return -s.sums, s.counts


# --------------------------------------------------------------------------- bytes per token

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # SentencePiece's '▁' (a space in running text)


def _decoded_len(tokenizer, i: int) -> int:
    try:
        return len(tokenizer.decode([i]).encode("utf-8"))
    except Exception:  # noqa: BLE001 - special/control ids may not decode
        return 0


def _decoder_types(tk) -> set[str]:
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(tk.to_str()).get("decoder"))
    return found


def _hf_byte_lengths(tokenizer, out: np.ndarray) -> None:
    tk = tokenizer.tk
    types = _decoder_types(tk)
    alphabet = set(bytes_to_unicode().values())
    added = tk.get_added_tokens_decoder()  # {id: AddedToken}
    for i in range(len(out)):
        if i in added:  # matched whole and decoded as their content
            a = added[i]  # a normalized one is spelled as the normalizer writes it
            content = a.content.replace(_SPACE, " ") if a.normalized else a.content
            out[i] = 0 if a.special else len(content.encode("utf-8"))
            continue
        piece = tk.id_to_token(i)
        if piece is None or i in (tokenizer.bos_id, tokenizer.eos_id):
            continue
        if "ByteLevel" in types and set(piece) <= alphabet:
            out[i] = len(piece)  # one byte per character of GPT-2's byte alphabet
        elif "ByteFallback" in types and _BYTE_PIECE.fullmatch(piece):
            out[i] = 1
        elif _SPACE in piece or "Metaspace" in types:
            out[i] = len(piece.replace(_SPACE, " ").encode("utf-8"))
        else:
            out[i] = _decoded_len(tokenizer, i)


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for inside running text: [vocab_size] float64, 0 for
    specials (BOS, EOS, control, unknown) and ids past the tokenizer's vocabulary.

    Summed over a token sequence this is the UTF-8 length of its decoded text, which decoding
    tokens one at a time does not give:
      byte tokenizer    ids 0..255 are one byte each (a lone byte >= 0x80 decodes to U+FFFD);
      SentencePiece     a piece's '▁' is the space it stands for (per-token decoding drops a
                        leading one; a tokenizer that prefixes a space counts that one too),
                        '<0xNN>' byte pieces are one byte;
      HF `tokenizers`   byte-level BPE pieces are one byte per character of GPT-2's byte
                        alphabet; SentencePiece-style vocabularies as above; added tokens their
                        content (special ones 0);
      others (char)     `decode([id])`.
    """
    out = np.zeros((vocab_size,), np.float64)
    n = min(tokenizer.vocab_size, vocab_size)
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        out[: min(256, n)] = 1.0
        return out
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        for i in range(n):
            if sp.IsControl(i) or sp.IsUnknown(i):
                continue
            piece = sp.IdToPiece(i)
            out[i] = 1 if sp.IsByte(i) else len(piece.replace(_SPACE, " ").encode("utf-8"))
        return out
    if hasattr(tokenizer, "tk"):
        _hf_byte_lengths(tokenizer, out[:n])
        return out
    for i in range(n):
        if i not in (tokenizer.bos_id, tokenizer.eos_id):
            out[i] = _decoded_len(tokenizer, i)
    return out
