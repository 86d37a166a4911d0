"""`DataConfig`: where text comes from, how it is tokenized and cut into batches."""

from __future__ import annotations

import dataclasses

from lm_jax.configs.base import ConfigError
from lm_jax.data.factory import parse_tokenizer_spec
from lm_jax.data.sources import DataSourceError, parse_source


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data for pretraining; every field is a `--data.<field>` flag."""

    # in memory: shakespeare | tinyshakespeare:<path> | file:<glob> | paragraphs:<glob>
    # streamed: stream:<glob> | stream_lines:<glob> | array_record:<glob> | tfds:<name>[:key]
    # | tfds_dir:<path>[:key]; mixtures: mix:0.7*stream:/a.txt,0.3*tfds:lm1b (see sources.py)
    source: str = "shakespeare"
    # char | byte | sentencepiece:<bpe|unigram>:<vocab> | dir:<saved tokenizer folder>
    # (char-level: the embedded corpus has ~80 distinct characters, as nanoGPT's shakespeare_char)
    tokenizer: str = "char"
    seq_len: int = 128  # T: input tokens per row (rows hold seq_len + 1 tokens)
    batch_size: int = 32  # global batch: rows per step over all processes together
    seed: int = 0  # shuffle seed (each epoch is a different permutation) and epoch offsets
    shuffle: bool = True  # shuffle training rows (False: corpus order, e.g. for debugging)
    num_workers: int = 0  # 0: rows made in this process; >0: grain worker processes, same batches
    val_fraction: float | None = None  # validation share of each document; None: source default
    epoch_offsets: bool = True  # from the 2nd epoch on, shift the row cut points by a seeded offset
    block_bytes: int = 1 << 20  # streamed text files: bytes per block (the unit shuffled/sharded)

    def __post_init__(self):
        try:
            parse_source(self.source)
        except DataSourceError as e:
            raise ConfigError(f"data.source: {e}") from None
        if self.seq_len <= 0:
            raise ConfigError(
                f"data.seq_len must be > 0, got {self.seq_len}; e.g. --data.seq_len=128"
            )
        if self.batch_size <= 0:
            raise ConfigError(
                f"data.batch_size must be > 0, got {self.batch_size}; e.g. --data.batch_size=32"
            )
        if self.num_workers < 0:
            raise ConfigError(
                f"data.num_workers must be >= 0 (0 = no worker processes), got {self.num_workers}"
            )
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"data.val_fraction must be in (0, 1) or unset, got {self.val_fraction}; "
                "e.g. --data.val_fraction=0.05"
            )
        if self.block_bytes < 256:
            raise ConfigError(
                f"data.block_bytes must be >= 256, got {self.block_bytes}; "
                "e.g. --data.block_bytes=1048576"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must be in [0, 2**32), got {self.seed}")
        parse_tokenizer_spec(self.tokenizer, error=ConfigError, prefix="data.tokenizer: ")
