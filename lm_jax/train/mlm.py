"""Masked-language-model pretraining of a BERT-family encoder, as a `Task` of the one loop
(`lm_jax.train.engine.run`: checkpoints, exact resume, SIGTERM, the non-finite policy).

Rows (`text_rows`): the corpus, tokenized once without special tokens, cut into consecutive
pieces of `max_tokens` minus the frame, each framed by the tokenizer's special tokens ([CLS] ...
[SEP]); the last `eval_fraction` of them are held out. A batch masks its rows with
`lm_jax.data.denoising.mlm_mask` (15%, 80/10/10; special tokens and padding never selected)
under `default_rng([seed, step])`: a function of the step index alone, as the unmasked rows are
(`lm_jax.train.example_task`). Held-out rows get fixed masks (one generator per evaluation
batch), so every evaluation scores the same tokens. Loss: mean cross entropy over the selected
positions (the encoder's "mlm" head: BertForMaskedLM's transform + tied decoder + bias).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.encoder import EncoderConfig
from lm_jax.configs.mlm import MLMConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.data.denoising import mlm_mask
from lm_jax.errors import ConfigError, DataSourceError
from lm_jax.nn.encoder import Encoder, abstract_params
from lm_jax.train.example_task import ExampleTask
from lm_jax.train.tagging import TRUNK, special_frame
from lm_jax.train.tagging import loss_fn as token_loss

MASK_TOKENS = ("[MASK]", "<mask>")


def mask_token_id(tokenizer) -> int:
    for name in MASK_TOKENS:
        i = tokenizer.tk.token_to_id(name)
        if i is not None:
            return int(i)
    raise ConfigError(
        "the tokenizer has no mask token ([MASK] / <mask>): MLM needs a BERT-family tokenizer"
    )


def text_rows(tokenizer, texts: Sequence[str], max_tokens: int) -> list[np.ndarray]:
    """Rows of subword ids: every text's ids, concatenated, cut into frames of `max_tokens`."""
    before, after = special_frame(tokenizer)
    body = max_tokens - len(before) - len(after)
    if body < 1:
        raise ConfigError(f"mlm.max_tokens={max_tokens} leaves no room inside the special tokens")
    ids = [i for enc in tokenizer.tk.encode_batch(list(texts), add_special_tokens=False)
           for i in enc.ids]  # fmt: skip
    return [np.asarray(before + ids[s : s + body] + after, np.int32)
            for s in range(0, len(ids), body)]  # fmt: skip


def collate(rows: Sequence[np.ndarray], batch_size: int, pad_id: int, max_tokens: int) -> dict:
    """{"tokens", "mask"} [batch_size, max_tokens]; filler rows attend to one key."""
    tokens = np.full((batch_size, max_tokens), pad_id, np.int32)
    mask = np.zeros((batch_size, max_tokens), np.int32)
    for j, r in enumerate(rows):
        tokens[j, : len(r)], mask[j, : len(r)] = r, 1
    mask[len(rows) :, 0] = 1
    return {"tokens": tokens, "mask": mask}


def loss_fn(params, batch, cfg: EncoderConfig, rng=None):
    """(mean CE over the selected positions, metrics {loss, tokens, accuracy})."""
    return token_loss(params, batch, cfg, rng, count="tokens")


@functools.lru_cache(maxsize=8)
def _eval_fn(cfg: EncoderConfig):
    def f(params, batch):
        _, m = loss_fn(params, batch, cfg)
        return m["loss"] * m["tokens"], m["accuracy"] * m["tokens"], m["tokens"]

    return jax.jit(f)


class MLMTask(ExampleTask):
    """MLM training of `cfg` (head "mlm") on `texts`; `pretrained`: trunk params to start from
    (None = random init; the MLM head always starts fresh unless `pretrained` holds it). The
    held-out score of the initial model is logged at step 0."""

    eval_at_start = True

    def __init__(self, cfg: EncoderConfig, mlm: MLMConfig, train_cfg: TrainConfig, tokenizer,
                 texts: Sequence[str], mesh, pretrained=None):  # fmt: skip
        if cfg.head != "mlm":
            raise ConfigError(f"MLM pretraining needs the encoder's 'mlm' head, got {cfg.head!r}")
        self.cfg, self.mlm, self.tokenizer = cfg, mlm, tokenizer
        keep = (*TRUNK, "mlm_head")
        self.init_given = None if pretrained is None else {
            k: v for k, v in pretrained.items() if k in keep}  # fmt: skip
        self.pad_id, self.mask_id = cfg.pad_token_id, mask_token_id(tokenizer)
        frame = special_frame(tokenizer)
        self.special = sorted({self.pad_id, *frame[0], *frame[1]})
        rows = text_rows(tokenizer, texts, mlm.max_tokens)
        n_eval = max(1, round(len(rows) * mlm.eval_fraction))
        if len(rows) - n_eval < 1:
            raise DataSourceError(
                f"the corpus makes {len(rows)} rows of {mlm.max_tokens} tokens: too few to hold "
                f"out {mlm.eval_fraction:.0%}; give more text"
            )
        self.rows, self.eval_rows = rows[:-n_eval], rows[-n_eval:]
        self.setup(abstract_params(cfg), lambda p, b, r: loss_fn(p, b, cfg, r),
                   ("tokens", "mask", "labels"), [len(r) for r in self.rows], mlm.batch_size,
                   1, train_cfg, mesh)  # fmt: skip

    def _mask(self, batch: dict, rng: np.random.Generator) -> dict:
        maskable = np.where(batch["mask"] > 0, batch["tokens"], self.pad_id)
        tokens, labels = mlm_mask(maskable, rng, mask_id=self.mask_id,
                                  vocab_size=self.cfg.model.vocab_size,
                                  special_ids=self.special, rate=self.mlm.rate)  # fmt: skip
        return {**batch, "tokens": tokens.astype(np.int32), "labels": labels.astype(np.int32)}

    def init_params(self, rng, given):
        tokens = jnp.zeros((1, min(8, self.cfg.model.max_len)), jnp.int32)
        p = nn.unbox(Encoder(self.cfg).init(rng, tokens)["params"])
        return p if given is None else {**p, **given}

    def collate(self, indices) -> dict:
        m = self.mlm
        return collate([self.rows[i] for i in indices], m.batch_size, self.pad_id, m.max_tokens)

    def batch(self, step: int) -> dict:
        return self._mask(super().batch(step), np.random.default_rng([self.train_cfg.seed, step]))

    def meta(self) -> dict:
        return {"mlm": {"encoder": self.cfg.to_dict(), "config": dataclasses.asdict(self.mlm),
                        "pretrained": self.init_given is not None}}  # fmt: skip

    def describe(self, state) -> str:
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        return (f"MLM encoder {n / 1e6:.1f}M params, {len(self.rows)} rows of "
                f"{self.mlm.max_tokens} ({len(self.eval_rows)} held out), {self.epoch_steps} "
                "batches an epoch")  # fmt: skip

    def score(self, params, limit: int = 0) -> dict:
        """Held-out MLM loss, perplexity and accuracy over the fixed masks."""
        rows = self.eval_rows[: limit or None]
        B, fn = self.mlm.eval_batch_size, _eval_fn(self.cfg)
        nll = hits = n = 0.0
        with jax.set_mesh(self.mesh):
            for s in range(0, len(rows), B):
                b = collate(rows[s : s + B], B, self.pad_id, self.mlm.max_tokens)
                rng = np.random.default_rng([self.train_cfg.seed, 1 << 30, s])
                a, h, k = fn(params, self._mask(b, rng))
                nll, hits, n = nll + float(a), hits + float(h), n + float(k)
        loss = nll / max(n, 1.0)
        return {"mlm_loss": loss, "mlm_perplexity": float(np.exp(loss)),
                "mlm_accuracy": hits / max(n, 1.0), "masked_tokens": int(n)}  # fmt: skip

    def evaluate(self, state, step: int) -> dict:
        return self.score(state.params, self.mlm.eval_limit)

    def final_evaluate(self, state, step: int) -> dict:
        return self.score(state.params)
