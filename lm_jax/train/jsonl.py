"""JSONL training files: one JSON object per line, every error naming `path:line`.

The one reader behind fine-tuning examples (`sft_data.read_jsonl`), preference pairs
(`preference_data.read_preference_jsonl`) and chat conversations (`chat_data.read_messages`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from lm_jax.configs.base import ConfigError


def jsonl_objects(path: str, keys: Sequence[str], what: str = "training") -> Iterator[tuple]:
    """(where = "path:line", object) for every non-blank line of `path`, an object holding
    `keys`. FileNotFoundError if `path` is no file; ConfigError naming the line if it is not
    JSON, not an object, or misses a key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} not found.")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{where}: not JSON ({e}); each line must be one JSON object with {list(keys)}."
                ) from None
            if not isinstance(d, dict):
                raise ConfigError(f"{where}: each line must be a JSON object with {list(keys)}.")
            missing = [k for k in keys if k not in d]
            if missing:
                raise ConfigError(
                    f"{where}: missing key {missing[0]!r}; each line needs {list(keys)}."
                )
            yield where, d


def check_strings(where: str, d: dict, keys: Sequence[str]) -> None:
    """ConfigError naming `where` unless every `d[k]` is a string."""
    for k in keys:
        if not isinstance(d[k], str):
            raise ConfigError(f"{where}: {k!r} must be a string, got {type(d[k]).__name__}.")
