"""Sequence labelling (POS tagging, NER) with a BERT-family encoder and a token-classification
head, as a `Task` of the one loop (`lm_jax.train.engine.run`: checkpoints, exact resume,
SIGTERM, the non-finite policy, metrics).

Rows (`encode_sentences`): a sentence's words are split into subwords by the tokenizer as
pre-tokenized input (transformers' `is_split_into_words=True`), framed by the tokenizer's
special tokens ([CLS] ... [SEP]); each word's label sits on its **first subword**, the other
positions are not scored (label -1). A word the tokenizer turns into nothing (a lone control
character) becomes [UNK], so every word has a position and a prediction. Sentences longer than
`max_tokens` are cut into rows of whole words; a single word with more subwords than a row holds
keeps its first ones (its label sits on the first).

Batches are a function of the step index alone (`lm_jax.train.example_task`: per-epoch seeded
permutation, length-sorted pools, shuffled batches): nothing but the train state needs saving.
Loss: mean cross entropy over the labelled positions of the batch; AdamW (`optim`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.encoder import EncoderConfig
from lm_jax.configs.tagging import TaggerConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.errors import ConfigError, DataSourceError
from lm_jax.losses import cross_entropy
from lm_jax.nn.encoder import Encoder, abstract_params
from lm_jax.train.example_task import ExampleTask, epoch_batches  # noqa: F401 - re-exported
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
    raise ConfigError(
        "the tokenizer has no unknown-word token ([UNK] / <unk>) for words it turns into no "
        "subword; use a tokenizer with one"
    )


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


def loss_fn(params, batch, cfg: EncoderConfig, rng=None, count: str = "words"):
    """(mean CE over labelled positions (labels >= 0), metrics {loss, `count`, accuracy});
    also MLM's loss (`lm_jax.train.mlm`, over the masked positions)."""
    out = Encoder(cfg).apply(
        {"params": params}, batch["tokens"], attention_mask=batch["mask"],
        deterministic=rng is None, rngs=None if rng is None else {"dropout": rng},
    )  # fmt: skip
    labels = batch["labels"]
    valid = labels >= 0
    nll, _, n = cross_entropy(out.logits, jnp.maximum(labels, 0), valid)
    hits = jnp.sum((jnp.argmax(out.logits, -1) == labels) & valid)
    loss = nll / jnp.maximum(n, 1.0)
    return loss, {"loss": loss, count: n, "accuracy": hits / jnp.maximum(n, 1.0)}


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


class TaggingTask(ExampleTask):
    """Token-classification training of `cfg` (head "token") on tagged sentences.

    `train`: (words, label ids) per sentence; `evals`: {split: (words, gold tag strings)};
    `labels`: the tag of each label id; `score(gold, predicted) -> dict` (tag strings per
    sentence); `pretrained`: trunk params to start from (None = random init)."""

    def __init__(self, cfg: EncoderConfig, tagger: TaggerConfig, train_cfg: TrainConfig,
                 tokenizer, train, evals: dict, labels: Sequence[str],
                 score: Callable[[list, list], dict], mesh, pretrained=None):  # fmt: skip
        self.cfg, self.tagger = cfg, tagger
        self.tokenizer, self.labels, self.score = tokenizer, list(labels), score
        self.init_given = None if pretrained is None else {k: pretrained[k] for k in TRUNK}
        self.pad_id = cfg.pad_token_id
        words, ids = [w for w, _ in train], [y for _, y in train]
        self.rows = encode_sentences(tokenizer, words, ids, tagger.max_tokens)
        if not self.rows:
            raise DataSourceError("no training sentences to tag")
        self.evals = {
            k: (ws, tags, encode_sentences(tokenizer, ws, None, tagger.max_tokens))
            for k, (ws, tags) in evals.items()
        }
        self.setup(abstract_params(cfg), lambda p, b, r: loss_fn(p, b, cfg, r),
                   ("tokens", "mask", "labels"), [len(r.ids) for r in self.rows],
                   tagger.batch_size, tagger.pool_batches, train_cfg, mesh)  # fmt: skip

    def init_params(self, rng, given):
        tokens = jnp.zeros((1, min(8, self.cfg.model.max_len)), jnp.int32)
        p = nn.unbox(Encoder(self.cfg).init(rng, tokens)["params"])
        return p if given is None else {**p, **given}  # the pretrained trunk, a random head

    def collate(self, indices) -> dict:
        t = self.tagger
        return collate([self.rows[i] for i in indices], t.batch_size, self.pad_id, t.max_tokens)

    def meta(self) -> dict:
        return {
            "tagger": {"encoder": self.cfg.to_dict(), "labels": self.labels,
                       "config": dataclasses.asdict(self.tagger),
                       "pretrained": self.init_given is not None},
        }  # fmt: skip

    def describe(self, state) -> str:
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        return (f"token tagger {n / 1e6:.1f}M params, {len(self.labels)} labels, "
                f"{len(self.rows)} rows, {self.epoch_steps} batches an epoch")  # fmt: skip

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
