"""Classification with LMs: metrics (scikit-learn), option log-likelihood scoring (zero/few-shot)
and a small Flax classification head on the LM's final hidden state."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm_jax.configs.base import ModelConfig
from lm_jax.eval.perplexity import batch_rows
from lm_jax.nn.transformer import Transformer
from lm_jax.scoring import EvalError, Scorer
from lm_jax.utils import round_up as _round_up

LENGTH_BUCKET = 16  # padded sequence lengths are multiples of this (fewer recompiles)


def classification_metrics(y_true: Sequence, y_pred: Sequence, labels=None) -> dict[str, float]:
    """Accuracy, macro precision / recall / F1 (scikit-learn; zero_division=0)."""
    from sklearn import metrics

    if len(y_true) == 0:
        raise EvalError("no examples to score: the evaluation set is empty")
    if len(y_true) != len(y_pred):
        raise EvalError(f"{len(y_true)} labels but {len(y_pred)} predictions: they must pair up")
    p, r, f, _ = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    return {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "precision": float(p),
        "recall": float(r),
        "macro_f1": float(f),
        "n": len(y_true),
    }


# --------------------------------------------------------------------------- option likelihood


def option_loglikelihoods(
    cfg: ModelConfig,
    params,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[str] | Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    mesh=None,
    add_bos: bool = False,
    scorer: Scorer | None = None,
    single_token_fast_path: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum log p(option tokens | prompt) for every (prompt, option): ([N, K], token counts [N, K]).

    `options` is one list for all prompts, or one list per prompt (same K). Prompt and option are
    tokenised separately (give options their leading space, e.g. " positive"); too-long prompts
    lose their oldest tokens. All N*K sequences run as right-padded rows, `batch_size` at a time.
    When every option is one token, each prompt runs once and all K options are read from its
    last position's log-softmax (the same numbers, K times fewer forward passes).
    """
    if len(prompts) == 0:
        raise EvalError("no prompts to score: the evaluation set is empty")
    per_prompt = [list(options)] * len(prompts) if isinstance(options[0], str) else options
    if len(per_prompt) != len(prompts):
        raise EvalError(f"{len(prompts)} prompts but {len(per_prompt)} option lists")
    K = len(per_prompt[0])
    if K == 0 or any(len(o) != K for o in per_prompt):
        raise EvalError("every prompt needs the same, non-zero number of options")
    opt_cache: dict[str, list[int]] = {}
    pieces = []
    for prompt, opts in zip(prompts, per_prompt, strict=True):
        ctx = list(tokenizer.encode(prompt))
        if add_bos:
            ctx = [tokenizer.bos_id] + ctx
        for o in opts:
            if o not in opt_cache:
                opt_cache[o] = list(tokenizer.encode(o))
            cont = opt_cache[o]
            if not cont:
                raise EvalError(f"option {o!r} tokenizes to nothing")
            if not ctx:
                raise EvalError("a prompt tokenizes to nothing: give it text or add_bos=True")
            seq = (ctx + cont)[-(cfg.max_len + 1) :]
            n_cont = len(cont)
            if n_cont >= len(seq):
                raise EvalError(f"option {o!r} is longer than the model's max_len")
            pieces.append((np.asarray(seq, np.int32), n_cont))
    scorer = scorer or Scorer(cfg, params, mesh)
    if single_token_fast_path and all(len(opt_cache[o]) == 1 for o in opt_cache):
        return _single_token_options(scorer, cfg, pieces, K, batch_size)
    order = np.argsort([len(s) for s, _ in pieces], kind="stable")  # similar lengths together
    ll = np.zeros(len(pieces))
    cnt = np.zeros(len(pieces))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = _round_up(max(len(pieces[i][0]) - 1 for i in idx), LENGTH_BUCKET)
        T = min(T, cfg.max_len)
        rows = []
        for i in idx:
            seq, n_cont = pieces[i]
            n = len(seq) - 1
            row = {
                "inputs": np.zeros(T, np.int32),
                "targets": np.zeros(T, np.int32),
                "loss_mask": np.zeros(T, np.float32),
            }
            row["inputs"][:n], row["targets"][:n] = seq[:-1], seq[1:]
            row["loss_mask"][n - n_cont : n] = 1.0
            rows.append(row)
        (batch,) = batch_rows(rows, batch_size)
        nll, c = scorer.row_sums(batch)
        ll[idx], cnt[idx] = -nll[: len(idx)], c[: len(idx)]
    return ll.reshape(len(prompts), K), cnt.reshape(len(prompts), K)


def _single_token_options(scorer, cfg, pieces, K, batch_size):
    """pieces are (prompt + option token, 1) for every (prompt, option), options innermost: one
    row per prompt, every option read from its last position (`Scores.candidates`)."""
    N = len(pieces) // K
    ctx = [pieces[i * K][0][:-1] for i in range(N)]
    opts = np.asarray([[pieces[i * K + k][0][-1] for k in range(K)] for i in range(N)], np.int32)
    out = np.zeros((N, K))
    order = np.argsort([len(c) for c in ctx], kind="stable")
    for start in range(0, N, batch_size):
        idx = order[start : start + batch_size]
        T = min(_round_up(max(len(ctx[i]) for i in idx), LENGTH_BUCKET), cfg.max_len)
        rows, cand = [], np.zeros((batch_size, K), np.int32)
        for j, i in enumerate(idx):
            n = len(ctx[i])
            row = {
                "inputs": np.zeros(T, np.int32),
                "targets": np.zeros(T, np.int32),
                "loss_mask": np.zeros(T, np.float32),
            }
            row["inputs"][:n] = ctx[i]
            row["targets"][n - 1], row["loss_mask"][n - 1] = opts[i, 0], 1.0  # read at n - 1
            rows.append(row)
            cand[j] = opts[i]
        (batch,) = batch_rows(rows, batch_size)
        out[idx] = scorer.score(batch, cand).candidates[: len(idx)]
    return out, np.ones((N, K))


def predict_by_likelihood(loglik: np.ndarray, counts: np.ndarray | None = None, normalize=False):
    """argmax over options of the summed (or, with `normalize`, per-token) log-likelihood."""
    score = loglik / np.maximum(counts, 1) if normalize and counts is not None else loglik
    return np.argmax(score, axis=1)


# --------------------------------------------------------------------------- features + head


@functools.lru_cache(maxsize=8)
def _feature_fn(cfg: ModelConfig, pool: str):
    model = Transformer(cfg)

    def run(params, tokens, lengths):
        _, hidden = model.apply({"params": params}, tokens, return_hidden=True)  # [B, T, D]
        hidden = hidden.astype(jnp.float32)
        T = tokens.shape[1]
        valid = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.float32)  # [B, T]
        if pool == "mean":
            return jnp.sum(hidden * valid[..., None], 1) / jnp.maximum(valid.sum(1), 1)[:, None]
        last = jnp.maximum(lengths - 1, 0)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]

    return jax.jit(run)


def extract_features(
    cfg: ModelConfig,
    params,
    tokenizer,
    texts: Sequence[str],
    *,
    pool: str = "mean",
    batch_size: int = 32,
    prefix: str = "",
    suffix: str = "",
    add_bos: bool = False,
    max_tokens: int | None = None,
) -> np.ndarray:
    """Final-layer hidden state (after the final norm) of each text pooled over its tokens
    ("mean") or taken at its last token ("last"): [N, D] float32."""
    if pool not in ("mean", "last"):
        raise EvalError(f"pool must be 'mean' or 'last', got {pool!r}")
    if len(texts) == 0:
        raise EvalError("no texts to embed: the dataset is empty")
    limit = min(cfg.max_len, max_tokens or cfg.max_len)
    seqs = []
    for t in texts:
        ids = list(tokenizer.encode(prefix + t + suffix))
        if add_bos:
            ids = [tokenizer.bos_id] + ids
        seqs.append(np.asarray((ids or [tokenizer.pad_id])[-limit:], np.int32))
    fn = _feature_fn(cfg, pool)
    params = nn.unbox(params)
    out = np.zeros((len(texts), cfg.d_model), np.float32)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = min(_round_up(max(len(seqs[i]) for i in idx), LENGTH_BUCKET), limit)
        tokens = np.full((batch_size, T), tokenizer.pad_id, np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for j, i in enumerate(idx):
            tokens[j, : len(seqs[i])] = seqs[i]
            lengths[j] = len(seqs[i])
        feats = fn(params, jnp.asarray(tokens), jnp.asarray(lengths))
        out[idx] = np.asarray(feats)[: len(idx)]
    return out


class ClassificationHead(nn.Module):
    """Linear (hidden=0) or one-hidden-layer MLP classifier on pooled LM features."""

    num_classes: int
    hidden: int = 0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.hidden:
            x = nn.gelu(nn.Dense(self.hidden)(x))
            x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass
class TrainedHead:
    """A trained head and the feature standardisation it expects."""

    head: ClassificationHead
    params: dict
    mean: np.ndarray
    std: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return np.asarray(self.head.apply({"params": self.params}, jnp.asarray(x)))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(features), axis=-1)


def train_head(
    features: np.ndarray,
    labels: Sequence[int],
    num_classes: int,
    *,
    hidden: int = 0,
    dropout: float = 0.0,
    steps: int = 300,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 512,
    seed: int = 0,
) -> TrainedHead:
    """Train a `ClassificationHead` with optax AdamW (cross-entropy, cosine decay) on
    standardised features."""
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int32)
    if x.ndim != 2 or len(x) == 0:
        raise EvalError(f"features must be a non-empty [N, D] array, got shape {x.shape}")
    if len(x) != len(y):
        raise EvalError(f"{len(x)} feature rows but {len(y)} labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise EvalError(f"labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    head = ClassificationHead(num_classes, hidden, dropout)
    key = jax.random.key(seed)
    params = head.init(key, jnp.zeros((1, x.shape[1])))["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb, rng):
        def loss_fn(p):
            logits = head.apply({"params": p}, xb, deterministic=False, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(seed)
    bs = min(batch_size, len(x))
    for i in range(steps):
        idx = rng.choice(len(x), bs, replace=False)
        params, opt, _ = step(params, opt, x[idx], y[idx], jax.random.fold_in(key, i))
    return TrainedHead(head, params, mean, std)
