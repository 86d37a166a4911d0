"""Features phi(x) over token arrays: tokens [B,T] int32, mask [B,T] (1 = generated) -> [B] float32.

A `Feature` is a named function plus its kind: *pointwise* (a boolean constraint b(x) = phi(x),
enforced with log b = 0 / -inf) or *distributional* (a moment target E_p[phi] = mu_bar, met by a
lambda in the EBM). Word presence is a token-subsequence match in jnp (jit- and shard-friendly);
regexes decode on the host through `jax.pure_callback`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ConfigError

FeatureFn = Callable[[jax.Array, jax.Array], jax.Array]  # tokens [B,T], mask [B,T] -> [B]


class FeatureError(ConfigError):
    """A constraint spec or feature is malformed."""


@dataclasses.dataclass(frozen=True)
class Feature:
    """phi: (tokens [B,T], mask [B,T]) -> [B] float32; `binary` features take values in {0, 1}."""

    name: str
    fn: FeatureFn = dataclasses.field(compare=False)
    binary: bool = True

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return self.fn(tokens, mask).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A feature and its target: `target=None` = pointwise (phi(x) = 1 for every x), else a
    moment target E_p[phi] = target."""

    feature: Feature
    target: float | None = None

    @property
    def pointwise(self) -> bool:
        return self.target is None


def subsequence_present(tokens: jax.Array, mask: jax.Array, pattern: Sequence[int]) -> jax.Array:
    """1.0 where `pattern` occurs contiguously inside the masked part of a row: [B,T] -> [B]."""
    pat = jnp.asarray(pattern, jnp.int32)  # [m]
    m = int(pat.shape[0])
    T = tokens.shape[1]
    if m == 0 or m > T:
        return jnp.zeros(tokens.shape[:1], jnp.float32)
    n = T - m + 1
    hit = jnp.ones((tokens.shape[0], n), bool)  # [B, n]
    for j in range(m):  # m is small: one shifted compare per pattern token
        ok = (tokens[:, j : j + n] == pat[j]) & (mask[:, j : j + n] > 0)
        hit = hit & ok
    return jnp.any(hit, axis=1).astype(jnp.float32)


def token_sequences_feature(name: str, patterns: Sequence[Sequence[int]]) -> Feature:
    """Presence of any of several token sequences (e.g. a word's tokenisations)."""
    patterns = [tuple(int(t) for t in p) for p in patterns if len(p)]
    if not patterns:
        raise FeatureError(f"feature {name!r} has no non-empty token pattern.")

    def fn(tokens, mask):
        hits = [subsequence_present(tokens, mask, p) for p in patterns]
        return jnp.max(jnp.stack(hits), axis=0)

    return Feature(name, fn, binary=True)


def word_feature(tokenizer, word: str) -> Feature:
    """Presence of `word` as token subsequences: its tokenisations alone and after a space/newline
    (BPE tokenisers spell ' word' differently from 'word'). Char-level tokenisers match the exact
    characters. The match is on tokens, so a word split differently in context can be missed."""
    if not word:
        raise FeatureError("word constraint is empty: use e.g. word:amazing")
    pats = set()
    for prefix in ("", " ", "\n"):
        try:
            ids = [int(i) for i in tokenizer.encode(prefix + word)]
        except Exception as e:  # noqa: BLE001 - char tokenizers reject unseen characters
            if prefix == "":
                raise FeatureError(f"tokenizer cannot encode word {word!r}: {e}") from e
            continue
        if prefix:
            try:
                pre = [int(i) for i in tokenizer.encode(prefix)]
            except Exception:  # noqa: BLE001
                continue
            if ids[: len(pre)] == pre:  # prefix tokenised apart: keep only the word's tokens
                ids = ids[len(pre) :]
        if ids:
            pats.add(tuple(ids))
    return token_sequences_feature(f"word:{word}", sorted(pats))


def _boundary_tables(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(starts [V], ends [V]) bool: token v's text starts / ends with a word character
    (alphanumeric or apostrophe). Special tokens decode to '' and count as boundaries."""
    V = int(tokenizer.vocab_size)
    starts, ends = np.zeros(V, bool), np.zeros(V, bool)
    for v in range(V):
        try:
            s = tokenizer.decode([v])
        except Exception:  # noqa: BLE001 - ids a tokenizer cannot decode are boundaries
            continue
        if s:
            starts[v] = s[0].isalnum() or s[0] == "'"
            ends[v] = s[-1].isalnum() or s[-1] == "'"
    return starts, ends


def wholeword_feature(tokenizer, word: str) -> Feature:
    """Presence of `word` as a whole word (what `\\bword\\b` means on the text) in jnp: a token
    match of `word_feature` whose neighbours are not word characters: the token before
    (if generated) must not end with a letter/digit when the word starts with one, and the token
    after must not start with one ("love" matches "my love," but not "lovely" or "glove")."""
    word_feature(tokenizer, word)  # validates: empty or unencodable word -> FeatureError
    starts, ends = _boundary_tables(tokenizer)
    pats = []
    for prefix in ("", " ", "\n"):  # the same tokenisations word_feature matches
        try:
            ids = [int(i) for i in tokenizer.encode(prefix + word)]
            pre = [int(i) for i in tokenizer.encode(prefix)] if prefix else []
        except Exception:  # noqa: BLE001
            continue
        if pre and ids[: len(pre)] == pre:
            ids = ids[len(pre) :]
        if ids and tuple(ids) not in pats:
            pats.append(tuple(ids))
    starts_j, ends_j = jnp.asarray(starts), jnp.asarray(ends)

    def one(tokens, mask, pat):
        m, T = len(pat), tokens.shape[1]
        if m > T:
            return jnp.zeros(tokens.shape[:1], jnp.float32)
        n = T - m + 1
        hit = jnp.ones((tokens.shape[0], n), bool)  # [B, n] match starting at j
        for j, t in enumerate(pat):
            hit = hit & (tokens[:, j : j + n] == t) & (mask[:, j : j + n] > 0)
        live = mask > 0  # [B, T]
        if starts[pat[0]]:  # the token before must not end inside a word
            prev_word = ends_j[tokens[:, : n - 1]] & live[:, : n - 1]  # [B, n-1]
            prev_word = jnp.pad(prev_word, ((0, 0), (1, 0)))  # position 0: nothing before
            hit = hit & ~prev_word
        if ends[pat[-1]]:  # the token after must not start a word character
            nxt = starts_j[tokens[:, m:]] & live[:, m:]  # [B, n-1]
            hit = hit & ~jnp.pad(nxt, ((0, 0), (0, 1)))  # last start: nothing after
        return jnp.any(hit, axis=1).astype(jnp.float32)

    def fn(tokens, mask):
        return jnp.max(jnp.stack([one(tokens, mask, p) for p in pats]), axis=0)

    return Feature(f"wholeword:{word}", fn, binary=True)


def regex_feature(tokenizer, pattern: str) -> Feature:
    """re.search(pattern, decode(tokens[mask])) on the host (jax.pure_callback)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise FeatureError(f"bad regex {pattern!r}: {e}") from e

    def host(tokens, mask):
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        out = np.zeros(tokens.shape[0], np.float32)
        for i in range(tokens.shape[0]):
            text = tokenizer.decode([int(t) for t, m in zip(tokens[i], mask[i]) if m])
            out[i] = 1.0 if rx.search(text) else 0.0
        return out

    def fn(tokens, mask):
        spec = jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32)
        return jax.pure_callback(host, spec, tokens, mask, vmap_method="sequential")

    return Feature(f"regex:{pattern}", fn, binary=True)


def parse_constraint(spec: str, tokenizer) -> Constraint:
    """'word:amazing' (token subsequence, pointwise), 'wholeword:love' (whole word, in jnp),
    'word:she=0.5' / 'regex:\\bshe\\b=0.5' (moment target)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise FeatureError(
            f"constraint {spec!r} should look like word:amazing, regex:PATTERN or word:she=0.5"
        )
    target = None
    body, eq, value = rest.rpartition("=")
    if eq and body:
        try:
            target = float(value)
        except ValueError:
            body = rest  # an '=' inside a regex
        else:
            rest = body
    if kind == "word":
        feat = word_feature(tokenizer, rest)
    elif kind == "wholeword":
        feat = wholeword_feature(tokenizer, rest)
    elif kind == "regex":
        feat = regex_feature(tokenizer, rest)
    else:
        raise FeatureError(
            f"unknown constraint kind {kind!r} in {spec!r}: use word:, wholeword: or regex:"
        )
    return Constraint(feat, target)


def feature_matrix(features: Sequence[Feature], tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """phi [B, F] for all features."""
    if not features:
        return jnp.zeros((tokens.shape[0], 0), jnp.float32)
    return jnp.stack([f(tokens, mask) for f in features], axis=1)
