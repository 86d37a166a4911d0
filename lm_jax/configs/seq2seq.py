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
