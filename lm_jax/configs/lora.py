"""`LoraConfig`: which projections get low-rank adapters, their rank, scale and dropout.

The adapters themselves: `lm_jax.nn.lora` (the in-module hooks) and `lm_jax.adapters` (adapter
trees: split / combine / merge, optimizer masks, save / load, banks).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from lm_jax.errors import ConfigError

# Attention and (dense or expert) MLP projections of every layer.
DEFAULT_TARGETS = (r"attn/[qkvo]_proj$", r"mlp/(.+/)?(gate|up|down)_proj$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the projections whose path matches any regex in `targets`."""

    rank: int = 8  # r
    alpha: float = 16.0  # scale = alpha / r (alpha / sqrt(r) with rslora)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # re.search over paths like 'layers/attn/q_proj'
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    dropout: float = 0.0  # dropout on the LoRA input (training only)

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int | np.integer) or self.rank <= 0:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise ConfigError("lora.targets is empty: give at least one path regex.")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"lora.targets pattern {t!r} is not a valid regex: {e}") from e

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def matches(self, path: str) -> bool:
        return any(re.search(t, path) for t in self.targets)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping) -> LoraConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LoraConfig fields {sorted(unknown)}.")
        if "targets" in d and not isinstance(d["targets"], str):
            d["targets"] = tuple(d["targets"])
        return cls(**d)


def lora_config(cfg) -> LoraConfig:
    """A LoraConfig from a LoraConfig or a ModelConfig with `.lora` set."""
    if isinstance(cfg, LoraConfig):
        return cfg
    lora = getattr(cfg, "lora", None)
    if lora is None:
        raise ConfigError("the model config has no LoRA settings: set ModelConfig.lora.")
    return lora
