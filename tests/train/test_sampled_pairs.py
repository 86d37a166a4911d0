"""Preference pairs from ranked samples: the pairing rule on hand-made rewards, and on a tiny
random model every pair's chosen completion out-scores its rejected one under the reward, the
texts are the sampler's own, and the run is a function of the key."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import ConfigError, llama_style
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.nn import Transformer
from lm_jax.train.sampled_pairs import (
    rank_pairs,
    rank_token_pairs,
    ranked_pairs,
    sample_completions,
)

TOK = ByteTokenizer()
CFG = llama_style(vocab_size=257, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_len=64, initializer_range=0.2)  # fmt: skip


def vowel_share(prompts, completions, answers):
    return np.array([np.mean([ch in "aeiou" for ch in c]) if c else 0.0 for c in completions])


def test_rank_pairs_best_against_worst_without_ties():
    texts = ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3", "c0", "c1", "c2", "c3"]
    rewards = [0.1, 0.9, 0.5, 0.3, 1, 1, 1, 1, 1, 0, 1, 0]
    pairs = rank_pairs(["A", "B", "C"], texts, rewards, 4)
    got = [(p.prompt, p.chosen, p.rejected) for p in pairs]
    # A: 0.9 vs 0.1, then 0.5 vs 0.3; B: all tied, none; C: binary, two hits against two misses
    assert got == [("A", "a1", "a0"), ("A", "a2", "a3"), ("C", "c0", "c3"), ("C", "c2", "c1")]
    odd = rank_pairs(["A"], ["x", "y", "z"], [0.0, 1.0, 0.5], 3)  # the middle one sits out
    assert [(p.chosen, p.rejected) for p in odd] == [("y", "x")]
    tok = rank_token_pairs([5], [[1], [2, 3], [4]], [0.0, 1.0, 0.5])  # one group of 3
    assert len(tok) == 1 and tok[0].chosen[1] == tok[0].rejected[1] == 1
    assert tok[0].chosen[0].tolist() == [5, 2, 3] and tok[0].rejected[0].tolist() == [5, 1]
    with pytest.raises(ConfigError, match="need 8 completions"):
        rank_pairs(["A", "B"], texts[:6], rewards[:6], 4)


def test_ranked_pairs_on_a_tiny_model():
    params = nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    prompts = ["apple: ", "storm: ", "quiet: "]
    key = jax.random.key(3)
    pairs, stats = ranked_pairs(CFG, params, TOK, prompts, vowel_share, samples_per_prompt=4,
                                max_new_tokens=12, key=key, batch_size=12)  # fmt: skip
    assert stats["samples"] == 12 and stats["pairs"] == len(pairs) > 0
    for p in pairs:
        chosen, rejected = vowel_share(None, [p.chosen, p.rejected], None)
        assert chosen > rejected
    # the texts are the sampler's: one generate call over the same rows and key
    enc = [TOK.encode(p) for p in prompts for _ in range(4)]
    _, texts, _ = sample_completions(CFG, params, TOK, enc, jax.random.fold_in(key, 0), 12)
    assert {t for p in pairs for t in (p.chosen, p.rejected)} <= set(texts)
    again, _ = ranked_pairs(CFG, params, TOK, prompts, vowel_share, samples_per_prompt=4,
                            max_new_tokens=12, key=key, batch_size=12)  # fmt: skip
    assert again == pairs
    with pytest.raises(ConfigError, match="multiple of samples_per_prompt"):
        ranked_pairs(CFG, params, TOK, prompts, vowel_share, samples_per_prompt=4, batch_size=10)
