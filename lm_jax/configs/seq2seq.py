"""`Seq2SeqConfig`: batching, loss and decoding of a sequence-to-sequence run
(`lm_jax.train.seq2seq`); the optimiser, steps, mesh, seed and workdir are `TrainConfig`'s."""

from __future__ import annotations

import dataclasses

from lm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Batching, loss and decoding of a seq2seq run (the optimiser is `TrainConfig`'s)."""

    batch_size: int = 64  # pairs per update (a multiple of the mesh's data axis)
    epochs: float = 20.0  # train.steps, when set, wins
    max_source_len: int = 128  # subword tokens, EOS included; longer sources are an error
    max_target_len: int = 128
    label_smoothing: float = 0.1
    pool_batches: int = 50
    num_beams: int = 4
    length_penalty: float = 0.6
    max_new_tokens: int = 80
    eval_batch_size: int = 100
    eval_limit: int = 0  # sentences per split in the final BLEU evaluation (0 = all)

    def __post_init__(self):
        if min(self.batch_size, self.eval_batch_size, self.pool_batches, self.num_beams) < 1:
            raise ConfigError("seq2seq batch sizes, pool_batches and num_beams must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"seq2seq.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if min(self.max_source_len, self.max_target_len, self.max_new_tokens) < 2:
            raise ConfigError("seq2seq max_source_len, max_target_len, max_new_tokens must be >= 2")
        if not self.epochs > 0:
            raise ConfigError(f"seq2seq.epochs must be > 0, got {self.epochs}")


@dataclasses.dataclass(frozen=True)
class SpanConfig:
    """T5 span-corruption pretraining (`lm_jax.train.span_corruption`, `--span.<field>`): the
    text is cut into rows of `row_tokens`; each step corrupts its rows afresh (Raffel et al.:
    15% noise in spans of mean length 3, each span one sentinel). Sentinels are
    `num_sentinels` ids appended after the tokenizer's vocabulary, <extra_id_0> the last."""

    row_tokens: int = 64  # tokens per row before corruption
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    num_sentinels: int = 100
    eval_fraction: float = 0.02  # held-out tail of the rows (fixed corruption)

    def __post_init__(self):
        if self.row_tokens < 4 or self.num_sentinels < 1:
            raise ConfigError("span.row_tokens must be >= 4 and span.num_sentinels >= 1")
        if not 0.0 < self.noise_density < 1.0 or self.mean_span_length < 1.0:
            raise ConfigError("span.noise_density must be in (0, 1), span.mean_span_length >= 1")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"span.eval_fraction must be in (0, 0.5), got {self.eval_fraction}")
        if self.row_tokens * self.noise_density / self.mean_span_length > self.num_sentinels:
            raise ConfigError("span.num_sentinels is fewer than a row's noise spans: raise it")
