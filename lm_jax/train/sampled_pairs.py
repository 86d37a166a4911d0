"""Preference pairs from a model's own samples, ranked by a reward (on-policy DPO data).

For each prompt, k completions are drawn through the one sampler (`lm_jax.generate`); they are
ordered by reward, and the i-th best is paired with the i-th worst (i < k // 2) while the best
scores strictly higher. A binary reward thus yields min(#hits, #misses, k // 2) pairs per
prompt, and ties (all hits or all misses) none. The pairs feed `preference.posttrain` (DPO,
IPO, SimPO) as text, the way TRL's trainers take them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.generate import generate
from lm_jax.train.grpo_data import RewardFn
from lm_jax.train.preference_data import EncodedPair, PreferencePair
from lm_jax.train.sft_data import _encode


def sample_completions(cfg: ModelConfig, params, tokenizer, enc: Sequence[Sequence[int]], key,
                       max_new_tokens: int, temperature: float = 1.0):  # fmt: skip
    """One `generate` call over prompts `enc` (token ids, any lengths), stopping at EOS:
    (completion ids per row, EOS kept; texts, EOS dropped; generated tokens in all)."""
    eos = getattr(tokenizer, "eos_id", None)
    out = generate(cfg, params, [list(e) for e in enc], key, max_new_tokens,
                   temperature=temperature, stop_tokens=() if eos is None else [eos])  # fmt: skip
    toks, lengths = jax.device_get((out.tokens, out.lengths))
    ids = [[int(t) for t in r[:n]] for r, n in zip(toks, lengths)]
    texts = [tokenizer.decode([t for t in r if t != eos]) for r in ids]
    return ids, texts, int(np.sum(lengths))


def rank_indices(rewards, k: int) -> list[tuple[int, int, int]]:
    """(prompt p, chosen row, rejected row) for k consecutive rows per prompt: the i-th best
    against the i-th worst while strictly better (stable order on ties)."""
    rewards = np.asarray(rewards, np.float64).reshape(-1)
    if k < 1 or len(rewards) % k:
        raise ConfigError(f"{len(rewards)} rewards are not k = {k} per prompt.")
    out = []
    for p in range(len(rewards) // k):
        r = rewards[p * k : (p + 1) * k]
        order = np.argsort(-r, kind="stable")
        for i in range(k // 2):
            hi, lo = order[i], order[k - 1 - i]
            if r[hi] <= r[lo]:
                break
            out.append((p, p * k + int(hi), p * k + int(lo)))
    return out


def rank_pairs(prompts: Sequence[str], texts: Sequence[str], rewards, k: int
               ) -> list[PreferencePair]:  # fmt: skip
    """Pairs from k consecutive completions per prompt (rows p*k .. p*k+k-1 answer prompts[p]),
    as `rank_indices` pairs them."""
    n = len(np.asarray(rewards).reshape(-1))
    if len(texts) != len(prompts) * k or n != len(texts):
        raise ConfigError(
            f"{len(prompts)} prompts x {k} samples need {len(prompts) * k} completions and "
            f"rewards, got {len(texts)} and {n}."
        )
    return [PreferencePair(prompts[p], texts[hi], texts[lo])
            for p, hi, lo in rank_indices(rewards, k)]  # fmt: skip


def rank_token_pairs(prompt: Sequence[int], completions: Sequence[Sequence[int]], rewards
                     ) -> list[EncodedPair]:  # fmt: skip
    """Pairs of sampled token ids (one prompt, every completion in one group), ranked as
    `rank_indices` does, as `preference.posttrain` takes them: the exact sampled tokens, with no
    decode / re-encode round trip (which byte-level or subword tokenizers need not survive)."""
    prompt = [int(t) for t in prompt]
    row = lambda c: (np.asarray(prompt + [int(t) for t in c], np.int32), len(prompt))  # noqa: E731
    return [EncodedPair(row(completions[hi]), row(completions[lo]), False)
            for _, hi, lo in rank_indices(rewards, len(completions))]  # fmt: skip


def sample_rewards(cfg: ModelConfig, params, tokenizer, prompts: Sequence[str], reward: RewardFn,
                   *, samples_per_prompt: int = 1, max_new_tokens: int = 32, key=None,
                   temperature: float = 1.0, batch_size: int = 64
                   ) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """(texts, rewards [n * k]): `samples_per_prompt` = k completions of each prompt (rows
    p*k .. p*k+k-1), drawn `batch_size` rows per `generate` call (key `fold_in(key, first
    row)`), scored by `reward(prompts, completions, answers)` (a GRPO reward,
    `lm_jax.align.rewards.make_reward`; answers None)."""
    k = samples_per_prompt
    if k < 1 or batch_size < 1:
        raise ConfigError(f"samples_per_prompt and batch_size must be >= 1, got {k}, {batch_size}.")
    key = jax.random.key(0) if key is None else key
    rows = [(p, _encode(tokenizer, p, True)) for p in prompts for _ in range(k)]
    texts: list[str] = []
    for s in range(0, len(rows), batch_size):
        enc = [e for _, e in rows[s : s + batch_size]]
        k_s = jax.random.fold_in(key, s)
        texts += sample_completions(cfg, params, tokenizer, enc, k_s, max_new_tokens,
                                    temperature)[1]  # fmt: skip
    rewards = np.asarray(reward([p for p, _ in rows], texts, [None] * len(rows)), np.float64)
    return texts, rewards.reshape(-1)


def ranked_pairs(cfg: ModelConfig, params, tokenizer, prompts: Sequence[str], reward: RewardFn,
                 *, samples_per_prompt: int = 4, batch_size: int = 64, **sampling
                 ) -> tuple[list[PreferencePair], dict]:  # fmt: skip
    """(pairs, stats) from `samples_per_prompt` samples of each prompt (`sample_rewards`, whose
    keywords `sampling` takes: max_new_tokens, key, temperature; then `rank_pairs`); stats: the
    number of samples, their mean reward and the number of pairs."""
    k = samples_per_prompt
    if k < 2:
        raise ConfigError(f"samples_per_prompt must be >= 2 to rank samples, got {k}.")
    if batch_size % k:
        raise ConfigError(f"batch_size {batch_size} must be a multiple of samples_per_prompt {k}.")
    texts, rewards = sample_rewards(cfg, params, tokenizer, prompts, reward, samples_per_prompt=k,
                                    batch_size=batch_size, **sampling)  # fmt: skip
    pairs = rank_pairs(prompts, texts, rewards, k)
    stats = {"samples": len(texts), "mean_reward": float(rewards.mean()), "pairs": len(pairs)}
    return pairs, stats
