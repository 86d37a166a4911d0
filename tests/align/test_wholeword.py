"""wholeword: constraints (jnp) agree with the host regex \\bW\\b on the generated text."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.align import FeatureError, parse_constraint
from lm_jax.data.char_tokenizer import CharTokenizer

TOK = CharTokenizer("\n ,.'!abcdeghilmnorstvwy")
TEXTS = [
    "my love, come",
    "lovely day",
    "a glove is here",
    "love",
    "i love\nthee",
    "loved",
    "no love.",
    "clove love",
    "",
]


def _batch(texts, prompt="l"):
    """[prompt | text] rows, mask 1 on the text only (like the samplers' layout)."""
    rows = [TOK.encode(prompt) + TOK.encode(t) for t in texts]
    T = max(len(r) for r in rows)
    toks = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.float32)
    for i, r in enumerate(rows):
        toks[i, : len(r)] = r
        mask[i, len(prompt) : len(r)] = 1
    return jnp.asarray(toks), jnp.asarray(mask)


@pytest.mark.parametrize("word", ["love", "a", "thee"])
def test_wholeword_matches_regex(word):
    feat = parse_constraint(f"wholeword:{word}", TOK).feature
    toks, mask = _batch(TEXTS)
    got = np.asarray(jax.jit(feat)(toks, mask))
    want = [1.0 if re.search(rf"\b{re.escape(word)}\b", t) else 0.0 for t in TEXTS]
    np.testing.assert_array_equal(got, want)


def test_wholeword_target_and_errors():
    c = parse_constraint("wholeword:love=0.5", TOK)
    assert c.target == 0.5 and c.feature.name == "wholeword:love"
    with pytest.raises(FeatureError):
        parse_constraint("wholeword:", TOK)
    with pytest.raises(FeatureError):
        parse_constraint("wholeword:zzz", TOK)  # 'z' is not in the vocabulary
