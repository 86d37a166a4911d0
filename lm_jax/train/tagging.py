"""Sequence labelling (POS tagging, NER) with a BERT-family encoder and a token-classification
head, as a `Task` of the one loop (`lm_jax.train.engine.run`: checkpoints, exact resume,
SIGTERM, the non-finite policy, metrics).

Rows (`encode_sentences`): a sentence's words are split into subwords by the tokenizer as
pre-tokenized input (transformers' `is_split_into_words=True`), framed by the tokenizer's
special tokens ([CLS] ... [SEP]); each word's label sits on its **first subword**, the other
positions are not scored (label -1). A word the tokenizer turns into nothing (a lone control
character) becomes [UNK], so every word has a position and a prediction. Sentences longer than
`max_tokens` are cut into rows of whole words.

Batches are a function of the step index alone: epoch e's rows are permuted with
`default_rng([seed, e])`, sorted by length inside pools of `pool_batches` batches, cut into
batches, and the batches shuffled. Nothing but the train state needs saving to resume exactly.
Loss: mean cross entropy over the labelled positions of the batch; AdamW (`optim`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lm_jax.configs.encoder import EncoderConfig
from lm_jax.configs.tagging import TaggerConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.errors import ConfigError, DataSourceError
from lm_jax.losses import cross_entropy
from lm_jax.nn.encoder import Encoder, abstract_params
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, params_shardings
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash
from lm_jax.train.state import TrainState, opt_state_shardings
from lm_jax.train.step import apply_update
from lm_jax.utils import length_bucket

IGNORE = -1
TRUNK = ("embed_tokens", "embed_positions", "embed_token_types", "embed_norm", "layers")


class Row(NamedTuple):
    """One model row: ids [L], labels [L] (IGNORE off first subwords), the row positions of its
    words' first subwords [W], and which words they are (sentence index, first word index)."""

    ids: np.ndarray
    labels: np.ndarray
    word_pos: np.ndarray
    sentence: int
    first_word: int


def _raw(tokenizer):
    tk = getattr(tokenizer, "tk", None)
    if tk is None or not hasattr(tk, "encode"):
        raise ConfigError(
            "sequence labelling needs a Hugging Face `tokenizers` tokenizer (HFTokenizer: a BERT "
            f"folder's tokenizer.json); got {type(tokenizer).__name__}"
        )
    return tk


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the tokenizer's post-processor puts around one sentence."""
    enc = _raw(tokenizer).encode(["x"], is_pretokenized=True, add_special_tokens=True)
    where = [i for i, w in enumerate(enc.word_ids) if w is not None]
    return list(enc.ids[: where[0]]), list(enc.ids[where[-1] + 1 :])


def word_pieces(tokenizer, words: Sequence[str], unk_id: int) -> list[list[int]]:
    """Subword ids of each word (pre-tokenized encoding, no special tokens); empty -> [unk]."""
    enc = _raw(tokenizer).encode(list(words), is_pretokenized=True, add_special_tokens=False)
    pieces: list[list[int]] = [[] for _ in words]
    for i, w in zip(enc.ids, enc.word_ids):
        if w is not None:
            pieces[w].append(i)
    return [p or [unk_id] for p in pieces]


def unk_id_of(tokenizer) -> int:
    tk = _raw(tokenizer)
    for name in ("[UNK]", "<unk>", "<UNK>"):
        i = tk.token_to_id(name)
        if i is not None:
            return int(i)
    return int(getattr(tokenizer, "pad_id", 0) or 0)


def encode_sentences(
    tokenizer, sentences: Sequence[Sequence[str]], labels: Sequence[Sequence[int]] | None,
    max_tokens: int,
) -> list[Row]:  # fmt: skip
    """Rows of every sentence (module docstring); `labels` = label ids per word, or None."""
    before, after = special_frame(tokenizer)
    budget = max_tokens - len(before) - len(after)
    if budget < 1:
        raise ConfigError(
            f"tagger.max_tokens={max_tokens} leaves no room inside the special tokens"
        )
    unk, rows = unk_id_of(tokenizer), []
    for s, words in enumerate(sentences):
        if not words:
            continue
        pieces = word_pieces(tokenizer, words, unk)
        start = 0
        while start < len(words):
            ids, pos, end = list(before), [], start
            while end < len(words) and (
                end == start or len(ids) - len(before) + len(pieces[end]) <= budget
            ):
                pos.append(len(ids))
                ids.extend(pieces[end][: budget - (len(ids) - len(before))])
                end += 1
            ids.extend(after)
            lab = np.full(len(ids), IGNORE, np.int32)
            if labels is not None:
                lab[pos] = np.asarray(labels[s][start:end], np.int32)
            rows.append(Row(np.asarray(ids, np.int32), lab, np.asarray(pos, np.int32), s, start))
            start = end
    return rows


def epoch_batches(lengths: np.ndarray, batch_size: int, pool_batches: int, seed: int, epoch: int):
    """Row indices of each batch of epoch `epoch` (module docstring); the count never varies."""
    rng = np.random.default_rng([seed, epoch])
    order, pool, batches = rng.permutation(len(lengths)), batch_size * pool_batches, []
    for s in range(0, len(order), pool):
        chunk = order[s : s + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(rows: Sequence[Row], batch_size: int, pad_id: int, max_tokens: int) -> dict:
    """{"tokens", "mask", "labels"} [batch_size, T], T on the length ladder; filler rows empty."""
    longest = max(len(r.ids) for r in rows)
    T = min(length_bucket(longest, minimum=16), max(max_tokens, longest))
    tokens = np.full((batch_size, T), pad_id, np.int32)
    mask = np.zeros((batch_size, T), np.int32)
    labels = np.full((batch_size, T), IGNORE, np.int32)
    for j, r in enumerate(rows):
        tokens[j, : len(r.ids)], mask[j, : len(r.ids)], labels[j, : len(r.ids)] = r.ids, 1, r.labels
    mask[len(rows) :, 0] = 1  # filler rows attend to one key, so no softmax row is empty
    return {"tokens": tokens, "mask": mask, "labels": labels}


def loss_fn(params, batch, cfg: EncoderConfig, rng=None):
    """(mean CE over labelled positions, metrics)."""
    out = Encoder(cfg).apply(
        {"params": params}, batch["tokens"], attention_mask=batch["mask"],
        deterministic=rng is None, rngs=None if rng is None else {"dropout": rng},
    )  # fmt: skip
    labels = batch["labels"]
    valid = labels >= 0
    nll, _, n = cross_entropy(out.logits, jnp.maximum(labels, 0), valid)
    hits = jnp.sum((jnp.argmax(out.logits, -1) == labels) & valid)
    loss = nll / jnp.maximum(n, 1.0)
    return loss, {"loss": loss, "words": n, "accuracy": hits / jnp.maximum(n, 1.0)}


def _train_step(state: TrainState, batch, rng, *, cfg, tx, train_cfg):
    rng = jax.random.fold_in(rng, state.step)
    grads, m = jax.grad(loss_fn, has_aux=True)(state.params, batch, cfg, rng)
    new, gnorm, finite = apply_update(state, grads, m["loss"], tx=tx, train_cfg=train_cfg)
    return new, {**m, "grad_norm": gnorm, "finite": finite}


@functools.lru_cache(maxsize=8)
def _predict_fn(cfg: EncoderConfig):
    @jax.jit
    def f(params, tokens, mask):
        out = Encoder(cfg).apply({"params": params}, tokens, attention_mask=mask)
        return jnp.argmax(out.logits, -1).astype(jnp.int32)  # [B, T]

    return f


def predict(cfg: EncoderConfig, params, rows: Sequence[Row], n_words: Sequence[int],
            batch_size: int, pad_id: int, max_tokens: int) -> list[np.ndarray]:  # fmt: skip
    """Predicted label ids per sentence ([n_words[s]] each) from rows of those sentences."""
    out = [np.full(n, IGNORE, np.int32) for n in n_words]
    order = np.argsort([len(r.ids) for r in rows], kind="stable")
    fn = _predict_fn(cfg)
    for s in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[s : s + batch_size]]
        b = collate(chunk, batch_size, pad_id, max_tokens)
        ids = np.asarray(fn(params, b["tokens"], b["mask"]))
        for j, r in enumerate(chunk):
            out[r.sentence][r.first_word : r.first_word + len(r.word_pos)] = ids[j, r.word_pos]
    return out


class TaggingTask(Task):
    """Token-classification training of `cfg` (head "token") on tagged sentences.

    `train`: (words, label ids) per sentence; `evals`: {split: (words, gold tag strings)};
    `labels`: the tag of each label id; `score(gold, predicted) -> dict` (tag strings per
    sentence); `pretrained`: trunk params to start from (None = random init)."""

    def __init__(self, cfg: EncoderConfig, tagger: TaggerConfig, train_cfg: TrainConfig,
                 tokenizer, train, evals: dict, labels: Sequence[str],
                 score: Callable[[list, list], dict], mesh, pretrained=None):  # fmt: skip
        self.cfg, self.tagger, self.train_cfg, self.mesh = cfg, tagger, train_cfg, mesh
        self.tokenizer, self.labels, self.score, self.pretrained = (
            tokenizer,
            list(labels),
            score,
            pretrained,
        )
        self.pad_id = cfg.pad_token_id
        words, ids = [w for w, _ in train], [y for _, y in train]
        self.rows = encode_sentences(tokenizer, words, ids, tagger.max_tokens)
        if not self.rows:
            raise DataSourceError("no training sentences to tag")
        self.lengths = np.asarray([len(r.ids) for r in self.rows])
        self.epoch_steps = len(
            epoch_batches(self.lengths, tagger.batch_size, tagger.pool_batches, 0, 0)
        )
        self.evals = {
            k: (ws, tags, encode_sentences(tokenizer, ws, None, tagger.max_tokens))
            for k, (ws, tags) in evals.items()
        }
        self.tx = make_optimizer(train_cfg)
        self.rng = jax.random.key(train_cfg.seed + 1)
        boxed = abstract_params(cfg)
        p_sh = params_shardings(boxed, mesh)
        params = nn.unbox(boxed)
        o_abs = jax.eval_shape(self.tx.init, params)
        rep = NamedSharding(mesh, PartitionSpec())
        self.shardings = TrainState(rep, p_sh, opt_state_shardings(o_abs, params, p_sh, mesh), rep)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        self.abstract = TrainState(scalar, params, o_abs, scalar)
        b_sh = batch_sharding(mesh, 2, tagger.batch_size)
        step = functools.partial(_train_step, cfg=cfg, tx=self.tx, train_cfg=train_cfg)
        batch_sh = {k: b_sh for k in ("tokens", "mask", "labels")}
        self._step = jax.jit(
            step, in_shardings=(self.shardings, batch_sh, None),
            out_shardings=(self.shardings, None), donate_argnums=(0,),
        )  # fmt: skip
        self._epoch: tuple[int, list] | None = None
        self._batch_ids = np.zeros(0, np.int64)

    def steps_for(self, epochs: float) -> int:
        return max(1, int(round(epochs * self.epoch_steps)))

    def init_state(self):
        cfg, tx, given = self.cfg, self.tx, self.pretrained
        tokens = jnp.zeros((1, min(8, cfg.model.max_len)), jnp.int32)

        def make(rng, given):
            p = nn.unbox(Encoder(cfg).init(rng, tokens)["params"])
            if given is not None:
                p = {**p, **given}
            z = jnp.zeros((), jnp.int32)
            return TrainState(z, p, tx.init(p), z)

        given = None if given is None else {k: given[k] for k in TRUNK}
        with jax.set_mesh(self.mesh):
            return jax.jit(make, out_shardings=self.shardings)(
                jax.random.key(self.train_cfg.seed), given
            )

    def abstract_state(self):
        return self.abstract, self.shardings

    def meta(self) -> dict:
        return {
            "tagger": {"encoder": self.cfg.to_dict(), "labels": self.labels,
                       "config": dataclasses.asdict(self.tagger),
                       "pretrained": self.pretrained is not None},
        }  # fmt: skip

    def describe(self, state) -> str:
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        return (f"token tagger {n / 1e6:.1f}M params, {len(self.labels)} labels, "
                f"{len(self.rows)} rows, {self.epoch_steps} batches an epoch")  # fmt: skip

    def batch(self, step: int) -> dict:
        t = self.tagger
        epoch, j = divmod(step, self.epoch_steps)
        if self._epoch is None or self._epoch[0] != epoch:
            seed = self.train_cfg.seed
            self._epoch = (
                epoch,
                epoch_batches(self.lengths, t.batch_size, t.pool_batches, seed, epoch),
            )
        self._batch_ids = self._epoch[1][j]
        rows = [self.rows[i] for i in self._batch_ids]
        return collate(rows, t.batch_size, self.pad_id, t.max_tokens)

    def train_step(self, state, step: int):
        batch = self.batch(step)
        with jax.set_mesh(self.mesh):
            return self._step(state, batch, self.rng)

    def step_record(self, step: int, metrics: dict, state) -> dict:
        return {
            "step": step, "loss_hex": float(metrics["loss"]).hex(),
            "batch_hash": hashlib.sha256(np.asarray(self._batch_ids).tobytes()).hexdigest()[:16],
            "params_hash": params_hash(state.params),
        }  # fmt: skip

    def predict_tags(self, state, name: str, limit: int = 0) -> tuple[list, list]:
        """(gold, predicted) tag strings of split `name` (its first `limit` sentences)."""
        words, gold, rows = self.evals[name]
        n = limit or len(words)
        rows = [r for r in rows if r.sentence < n]
        t = self.tagger
        with jax.set_mesh(self.mesh):
            ids = predict(self.cfg, state.params, rows, [len(w) for w in words[:n]],
                          t.eval_batch_size, self.pad_id, t.max_tokens)  # fmt: skip
        return [list(g) for g in gold[:n]], [[self.labels[i] for i in s] for s in ids]

    def _scores(self, state, names, limit: int = 0) -> dict:
        out = {}
        for name in names:
            for k, v in self.score(*self.predict_tags(state, name, limit)).items():
                out[f"{name}_{k}"] = v
        return out

    def evaluate(self, state, step: int) -> dict:
        return self._scores(state, [k for k in self.evals if k == "dev"], self.tagger.eval_limit)

    def final_evaluate(self, state, step: int) -> dict:
        return self._scores(state, list(self.evals))
