"""T5 span-corruption pretraining of an encoder-decoder, a `Seq2SeqTask` of the one loop whose
pairs are made afresh at every step (Raffel et al. 2020, `lm_jax.data.denoising`).

`text_rows`: the texts' token ids, concatenated, cut into rows of `SpanConfig.row_tokens`; the
last `eval_fraction` of them are held out. At step s the batch's rows are corrupted with
`default_rng([seed, s])`: the encoder reads the row with each noise span replaced by one
sentinel (then EOS), the decoder predicts each sentinel followed by the span it hides (then
EOS). A batch is a function of the step alone, so a resume sees the same corruptions. The
held-out rows are corrupted once (a generator per row) and scored by the label-smoothed loss
and perplexity at every evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lm_jax.configs.seq2seq import Seq2SeqConfig, SpanConfig
from lm_jax.configs.t5 import T5Config
from lm_jax.configs.train import TrainConfig
from lm_jax.data.denoising import span_corruption
from lm_jax.errors import ConfigError, DataSourceError
from lm_jax.train.seq2seq import Seq2SeqTask, collate


def text_rows(tokenizer, texts: Sequence[str], row_tokens: int) -> list[np.ndarray]:
    """Rows of `row_tokens` ids (the last may be shorter) of the concatenated texts."""
    ids = [i for t in texts for i in tokenizer.encode(t)]
    rows = [np.asarray(ids[s : s + row_tokens], np.int32) for s in range(0, len(ids), row_tokens)]
    return [r for r in rows if len(r) >= 2]


class SpanCorruptionTask(Seq2SeqTask):
    """Span-corruption training of `cfg` on `rows` (`text_rows`); `cfg.model.vocab_size` is
    the tokenizer's vocabulary + `span.num_sentinels`. The held-out loss of the initial model
    is logged at step 0."""

    eval_at_start = True

    def __init__(self, cfg: T5Config, s2s: Seq2SeqConfig, span: SpanConfig,
                 train_cfg: TrainConfig, tokenizer, rows: Sequence[np.ndarray], mesh):  # fmt: skip
        if cfg.model.vocab_size != tokenizer.vocab_size + span.num_sentinels:
            raise ConfigError(
                f"the T5 vocabulary ({cfg.model.vocab_size}) must be the tokenizer's "
                f"{tokenizer.vocab_size} + span.num_sentinels {span.num_sentinels}"
            )
        n_eval = max(1, round(len(rows) * span.eval_fraction))
        if len(rows) - n_eval < 1:
            raise DataSourceError(f"the text makes {len(rows)} rows: too few to hold some out")
        self.span, self.sentinel, self.eos = span, cfg.model.vocab_size - 1, cfg.eos_token_id
        self.rows, self.eval_rows = list(rows[:-n_eval]), list(rows[-n_eval:])
        rng = np.random.default_rng([train_cfg.seed, 1 << 30])
        self.eval_pairs = [self.corrupt(r, rng) for r in self.eval_rows]
        # lengths for the length-sorted pools: corrupted pairs have about the row's length
        super().__init__(cfg, s2s, train_cfg, tokenizer, [(r, r) for r in self.rows], {}, mesh)
        self._rng = None

    def corrupt(self, row: np.ndarray, rng: np.random.Generator):
        a, b = span_corruption(row, rng, sentinel_start=self.sentinel,
                               eos_id=self.eos,
                               noise_density=self.span.noise_density,
                               mean_span_length=self.span.mean_span_length)  # fmt: skip
        # a = kept + spans + EOS, b = spans + noise + EOS
        spans = (len(a) + len(b) - len(row) - 2) // 2
        if spans > self.span.num_sentinels:  # more sentinels would reuse real token ids
            raise ConfigError(
                f"a row of {len(row)} tokens has {spans} noise spans but span.num_sentinels="
                f"{self.span.num_sentinels}: raise it"
            )
        return np.asarray(a, np.int32), np.asarray(b, np.int32)

    def batch(self, step: int) -> dict:
        self._rng = np.random.default_rng([self.train_cfg.seed, step])
        return super().batch(step)

    def collate(self, indices) -> dict:
        pairs = [self.corrupt(self.rows[i], self._rng) for i in indices]
        return collate(pairs, self.s2s.batch_size, self.cfg.decoder_start_token_id,
                       self.cfg.pad_token_id)  # fmt: skip

    def meta(self) -> dict:
        m = super().meta()
        m["seq2seq"]["span"] = dataclasses.asdict(self.span)
        return m

    def describe(self, state) -> str:
        return (super().describe(state).replace("pairs", "rows")
                + f", span corruption ({len(self.eval_rows)} rows held out)")  # fmt: skip

    def evaluate(self, state, step: int) -> dict:
        return {f"val_{k}": v for k, v in self.valid_loss(state, self.eval_pairs).items()}

    def final_evaluate(self, state, step: int) -> dict:
        return self.evaluate(state, step)
