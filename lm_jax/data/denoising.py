"""Denoising objectives' inputs, as pure numpy functions of (token ids, a numpy Generator).

- `mlm_mask` (BERT): each maskable token is selected with probability `rate` (15%); a selected
  token becomes [MASK] with probability 0.8, a uniformly random token with 0.1, and stays with
  0.1; labels hold the original id at selected positions and `IGNORE` elsewhere. Special tokens
  (and padding) are never selected. (transformers' `DataCollatorForLanguageModeling` recipe.)
- `span_corruption` (T5, Raffel et al. 2020): exactly round(L * noise_density) tokens of a
  length-L sequence are noise, in round(noise / mean_span_length) spans whose lengths and the
  gaps between them are random compositions (T5's `random_spans_noise_mask`); the input keeps
  the other tokens with each noise span replaced by one sentinel (`sentinel_start`, then
  descending ids: T5's <extra_id_0> = vocab - 1), and the target is each sentinel followed by
  the span it hides, then EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = -1


def mlm_mask(
    ids: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
    special_ids: Sequence[int] = (), rate: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(corrupted ids, labels), both shaped like `ids` (any shape, int)."""
    ids = np.asarray(ids)
    maskable = ~np.isin(ids, np.asarray(list(special_ids), ids.dtype))
    selected = (rng.random(ids.shape) < rate) & maskable
    labels = np.where(selected, ids, IGNORE)
    roll = rng.random(ids.shape)
    out = ids.copy()
    out[selected & (roll < 0.8)] = mask_id
    random_pos = selected & (roll >= 0.8) & (roll < 0.9)
    out[random_pos] = rng.integers(0, vocab_size, int(random_pos.sum()))
    return out, labels


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """n_segments positive lengths summing to n_items, uniformly among compositions."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_span_length: float = 3.0) -> np.ndarray:  # fmt: skip
    """Bool [length]: T5's random spans of noise, starting with a non-noise gap."""
    n_noise = int(np.round(length * noise_density))
    n_noise = min(max(n_noise, 1), length - 1)
    n_spans = max(int(np.round(n_noise / mean_span_length)), 1)
    noise = _random_segmentation(n_noise, n_spans, rng)
    keep = _random_segmentation(length - n_noise, n_spans, rng)
    mask = np.zeros(length, bool)
    pos = 0
    for k, z in zip(keep, noise):
        pos += k
        mask[pos : pos + z] = True
        pos += z
    return mask


def span_corruption(
    ids: Sequence[int], rng: np.random.Generator, *, sentinel_start: int, eos_id: int,
    noise_density: float = 0.15, mean_span_length: float = 3.0,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """(input ids, target ids) of one sequence (module docstring); needs len(ids) >= 2."""
    ids = list(ids)
    if len(ids) < 2:
        raise ValueError("span corruption needs at least 2 tokens")
    mask = noise_mask(len(ids), rng, noise_density, mean_span_length)
    inputs, targets, sentinel = [], [], sentinel_start
    for i, t in enumerate(ids):
        if mask[i]:
            if i == 0 or not mask[i - 1]:
                inputs.append(sentinel)
                targets.append(sentinel)
                sentinel -= 1
            targets.append(t)
        else:
            inputs.append(t)
    return inputs + [eos_id], targets + [eos_id]
