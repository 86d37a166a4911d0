"""Constraint specs over a real tokenizer: word (jnp subsequence), regex (host), targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.align import FeatureError, feature_matrix, parse_constraint
from lm_jax.data.char_tokenizer import CharTokenizer

TOK = CharTokenizer("\n abdehinorstwyz")
TEXTS = ["she is here", "the bird", "oh no", "shes"]


def _batch():
    rows = [TOK.encode(t) for t in TEXTS]
    T = max(len(r) for r in rows)
    toks = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.float32)
    for i, r in enumerate(rows):
        toks[i, : len(r)], mask[i, : len(r)] = r, 1
    return jnp.asarray(toks), jnp.asarray(mask)


def test_word_regex_and_targets():
    cons = [parse_constraint(s, TOK) for s in ("word:she", r"regex:\bshe\b=0.3", "regex:a=b")]
    assert cons[0].pointwise and cons[1].target == 0.3 and cons[2].pointwise
    toks, mask = _batch()
    phi = jax.jit(lambda t, m: feature_matrix([c.feature for c in cons], t, m))(toks, mask)
    np.testing.assert_array_equal(phi[:, 0], [1, 0, 0, 1])  # token match: "shes" contains "she"
    np.testing.assert_array_equal(phi[:, 1], [1, 0, 0, 0])  # regex word boundary
    np.testing.assert_array_equal(phi[:, 2], [0, 0, 0, 0])


@pytest.mark.parametrize("spec", ["she", "word:", "vibe:she", "regex:("])
def test_bad_specs(spec):
    with pytest.raises(FeatureError):
        parse_constraint(spec, TOK)
