"""`MLMConfig`: rows, masking and evaluation of masked-language-model pretraining of a BERT-family
encoder (`lm_jax.train.mlm`); the optimiser, steps, mesh, seed and workdir are `TrainConfig`'s."""

from __future__ import annotations

import dataclasses

from lm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    """The corpus is tokenized once and cut into rows of `max_tokens` subwords (the tokenizer's
    special tokens around each); the last `eval_fraction` of the rows (a contiguous tail: no
    text shared with training) is held out. Each batch masks `rate` of its maskable tokens,
    80% -> [MASK], 10% -> a random token, 10% kept (BERT), with a generator seeded by (seed,
    step), so a batch is a function of the step alone and a resume sees the same masks."""

    batch_size: int = 32  # rows per update (a multiple of the mesh's data axis)
    max_tokens: int = 128  # subword positions per row, special tokens included
    epochs: float = 1.0  # passes over the training rows (train.steps, when set, wins)
    rate: float = 0.15  # share of tokens selected for prediction
    eval_fraction: float = 0.05  # held-out tail of the rows
    eval_batch_size: int = 64
    eval_limit: int = 0  # held-out rows scored by the periodic evaluation (0 = all)

    def __post_init__(self):
        if min(self.batch_size, self.eval_batch_size) < 1:
            raise ConfigError("mlm.batch_size and mlm.eval_batch_size must be >= 1")
        if self.max_tokens < 4:
            raise ConfigError(f"mlm.max_tokens must be >= 4, got {self.max_tokens}")
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"mlm.rate must be in (0, 1), got {self.rate}")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"mlm.eval_fraction must be in (0, 0.5), got {self.eval_fraction}")
        if not self.epochs > 0 or self.eval_limit < 0:
            raise ConfigError("mlm.epochs must be > 0 and mlm.eval_limit >= 0")
