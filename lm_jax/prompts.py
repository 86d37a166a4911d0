"""Prompt and token-id input handling shared by the sampler and the sequence scorer: ragged
lists or padded arrays -> (tokens [B, T], lengths [B]), ids checked against the vocabulary with
an error that names the fix."""

from __future__ import annotations

import numpy as np

PROMPT_HINT = (
    "check the tokenizer matches the model and that padding is passed via prompt_lengths rather "
    "than as out-of-range ids."
)


def check_ids(arr: np.ndarray, vocab: int, what: str, hint: str = PROMPT_HINT) -> None:
    """ValueError naming the range and the fix if any id in `arr` is outside [0, vocab)."""
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"{what} must lie in [0, {vocab}) (the model's vocab_size), got min {lo}, max {hi}: "
            + hint
        )


def prepare_prompts(
    prompt_tokens, prompt_lengths=None, vocab_size: int | None = None, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged lists, or an int array [B, T] (+ prompt_lengths) -> (tokens [B, T], lengths [B]).

    Slots past each row's length are set to pad_id; valid ids are checked against vocab_size.
    """
    if isinstance(prompt_tokens, (list, tuple)) and (
        len(prompt_tokens) == 0 or not np.isscalar(prompt_tokens[0])
    ):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is only for an int array [B, T]; lists are ragged.")
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in prompt_tokens]
        lengths = np.array([len(r) for r in rows], np.int64)
        T = int(lengths.max()) if len(rows) else 0
        tokens = np.full((len(rows), T), pad_id, np.int64)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
    else:
        tokens = np.asarray(prompt_tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"prompt_tokens must be a list of token-id lists or an int array [B, T], got "
                f"dtype {tokens.dtype} and shape {tokens.shape}."
            )
        B, T = tokens.shape
        if prompt_lengths is None:
            lengths = np.full((B,), T, np.int64)
        else:
            lengths = np.asarray(prompt_lengths, np.int64).reshape(-1)
            if lengths.shape != (B,) or lengths.min(initial=0) < 0 or lengths.max(initial=0) > T:
                raise ValueError(
                    f"prompt_lengths must be [B={B}] ints in [1, T={T}], got {lengths.tolist()}."
                )
        tokens = np.where(np.arange(T)[None] < lengths[:, None], tokens, pad_id)
    if tokens.shape[0] == 0:
        raise ValueError("no prompts given: pass at least one prompt.")
    if lengths.min() < 1:
        empty = np.flatnonzero(lengths < 1).tolist()
        raise ValueError(
            f"prompts {empty} are empty: every prompt needs at least one token (e.g. BOS)."
        )
    if vocab_size is not None:
        valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
        check_ids(tokens[valid], vocab_size, "prompt tokens")
    return tokens.astype(np.int32), lengths.astype(np.int32)
