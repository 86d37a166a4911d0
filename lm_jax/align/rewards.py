"""GRPO's reward registry: plain Python callables over decoded text (see
`lm_jax.train.grpo_data.RewardFn`).

  arith_exact            exact-match arithmetic answer (`lm_jax.train.grpo_data.arith_exact`)
  arith_last             the first line's last integer is the answer (`grpo_data.arith_last`)
  wholeword:you, word:x,
  regex:PATTERN          an alignment feature (`lm_jax.align.features.parse_constraint`) of the
                         completion text, re-encoded with the tokenizer: phi(x) in {0, 1}
"""

from __future__ import annotations

import numpy as np

from lm_jax.align.features import parse_constraint
from lm_jax.train.grpo_data import RewardFn, arith_exact, arith_last, check_reward_spec


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def feature_reward(spec: str, tokenizer) -> RewardFn:
    """phi(completion) of the constraint `spec` (its target, if any, is ignored), [B]."""
    feature = parse_constraint(spec, tokenizer).feature

    def reward(prompts, completions, answers) -> np.ndarray:
        rows = [_encode(tokenizer, c) for c in completions]
        T = max(8, max((len(r) for r in rows), default=1))
        T = -(-T // 8) * 8  # few shapes compile
        toks = np.zeros((len(rows), T), np.int32)
        mask = np.zeros((len(rows), T), np.int32)
        for i, r in enumerate(rows):
            toks[i, : len(r)], mask[i, : len(r)] = r, 1
        return np.asarray(feature(toks, mask), np.float32)

    reward.__name__ = spec
    return reward


def make_reward(spec: str, tokenizer) -> RewardFn:
    """The reward named `spec` (ConfigError if unknown)."""
    check_reward_spec(spec)
    if spec in ("arith_exact", "arith_last"):
        return {"arith_exact": arith_exact, "arith_last": arith_last}[spec]
    return feature_reward(spec, tokenizer)
