"""`TaggerConfig`: how a sequence-labelling run reads and batches its sentences
(`lm_jax.train.tagging`); the optimiser, steps, mesh, seed and workdir are `TrainConfig`'s."""

from __future__ import annotations

import dataclasses

from lm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TaggerConfig:
    """Sentences become rows of subword ids (the tokenizer's special tokens around them); each
    word's label sits on its first subword, the others are not scored. A sentence with more
    than `max_tokens` subwords is cut into consecutive rows of whole words, so every word is
    trained on and predicted. Rows are grouped by length (pools of `pool_batches` batches,
    shuffled per epoch with the run's seed) and padded up a geometric ladder of lengths."""

    batch_size: int = 32  # rows per update (a multiple of the mesh's data axis)
    max_tokens: int = 128  # subword positions per row, special tokens included
    epochs: float = 3.0  # passes over the training rows (train.steps, when set, wins)
    eval_batch_size: int = 64
    eval_limit: int = 0  # dev sentences scored by the periodic evaluation (0 = all)
    pool_batches: int = 50  # length-sorting pool, in batches (1 = no length grouping)
    classifier_dropout: float | None = None  # None: the encoder's hidden dropout

    def __post_init__(self):
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(
                f"tagger.batch_size and tagger.eval_batch_size must be >= 1, got "
                f"{self.batch_size} and {self.eval_batch_size}"
            )
        if self.max_tokens < 4:
            raise ConfigError(f"tagger.max_tokens must be >= 4, got {self.max_tokens}")
        if not self.epochs > 0:
            raise ConfigError(f"tagger.epochs must be > 0, got {self.epochs}")
        if self.eval_limit < 0 or self.pool_batches < 1:
            raise ConfigError("tagger.eval_limit must be >= 0 and tagger.pool_batches >= 1")
        d = self.classifier_dropout
        if d is not None and not 0.0 <= d < 1.0:
            raise ConfigError(f"tagger.classifier_dropout must be in [0, 1), got {d}")
