"""Shared benchmark helpers: timing in rounds, matmul-peak probe, machine description."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import subprocess
import time

import numpy as np


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def timeit(fn, repeat: int = 3) -> float:
    """Median wall seconds of `fn()` over `repeat` calls (fn must block until done)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_flops(n: int = 1024, repeat: int = 5) -> float:
    """Measured f32 dense-matmul FLOP/s of this machine through jnp.dot (a noise probe too)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = timeit(lambda: f(a).block_until_ready(), repeat)
    return 2 * n**3 / t


def median(xs):
    return statistics.median(xs)


def random_lm_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A training batch of uniform random token ids, one unpacked row each: inputs / targets /
    positions / segment_ids int32 [B, T], loss_mask f32 [B, T]."""
    import jax.numpy as jnp  # noqa: PLC0415

    toks = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {
        "inputs": jnp.asarray(toks[:, :-1]),
        "targets": jnp.asarray(toks[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
        "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
        "loss_mask": jnp.ones((batch, seq_len), jnp.float32),
    }


@contextlib.contextmanager
def gguf_parsed_once():
    """Inside: `gguf.GGUFReader(path)` parses each path once and hands back that reader.

    transformers' `from_pretrained(..., gguf_file=...)` opens the file three times (config,
    weights, tokenizer) with gguf's GGUFReader, which takes ~6 s for SmolLM2's 49k vocabulary
    and ~25 s for Gemma 3's 262k; transformers only reads the parse, so one serves all three.
    """
    from unittest import mock

    import gguf

    with mock.patch.object(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader)):
        yield
