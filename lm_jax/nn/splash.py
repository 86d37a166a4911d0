"""Attention-kernel choice by backend (`ModelConfig.attention_impl`) and the Pallas splash kernel.

- "xla": `jax.nn.dot_product_attention(implementation=None)` with a boolean mask built from
  positions and segments (every backend; exact for any positions).
- "cudnn": `implementation="cudnn"` (cuDNN flash attention, NVIDIA GPUs, bf16/fp16 inputs).
- "splash": the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.
  splash_attention`); on CPU it runs in Pallas interpret mode (slow; for tests), on GPU it is
  refused (use "cudnn").
- "auto": splash on TPU, cuDNN on GPU for 16-bit compute, XLA otherwise.

cuDNN and splash apply causality by index (query i sees keys <= i), so both assume each
packed segment's positions count up from its start (how `lm_jax.data` packs rows); decoding
with a KV cache always takes the XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm_jax.configs.base import ConfigError

IMPLS = ("xla", "cudnn", "splash", "auto")


def resolve_impl(impl: str, dtype) -> str:
    """The concrete kernel ("xla", "cudnn" or "splash") for `ModelConfig.attention_impl`."""
    if impl not in IMPLS:
        raise ConfigError(f"attention_impl must be one of {IMPLS}, got {impl!r}.")
    backend = jax.default_backend()
    if impl == "auto":
        if backend == "tpu":
            return "splash"
        if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
            return "cudnn"
        return "xla"
    if impl == "splash" and backend == "gpu":
        raise ConfigError(
            "attention_impl='splash' is the Pallas TPU kernel; on NVIDIA GPUs use 'cudnn' "
            "(or 'auto')."
        )
    return impl


def _block(T: int) -> int:
    for b in (512, 256, 128):
        if T % b == 0:
            return b
    raise ConfigError(
        f"attention_impl='splash' needs the sequence length to be a multiple of 128, got {T}; "
        "pad the rows (data.seq_len) or use attention_impl='xla'."
    )


def _kernel(T: int, N: int, window: int | None, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    if window is None:
        mask = sm.CausalMask((T, T))
    else:
        mask = sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    b = _block(T)
    sizes = sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    multi = sm.MultiHeadMask([mask] * N)
    # Built per call, not cached: the kernel object keeps arrays made in the trace that first
    # calls it, so a kernel reused by another trace (eager apply, then jit) leaks tracers. Its
    # mask tables are concrete arrays, also inside a traced branch (lax.cond over layer kinds).
    with jax.ensure_compile_time_eval():
        kern = sk.make_splash_mha(
            multi,
            head_shards=1,
            q_seq_shards=1,
            block_sizes=sizes,
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )
    return kern, sk.SegmentIds


def splash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    segment_ids: jax.Array | None = None,  # [B, T]
    window: int | None = None,
    scale: float | None = None,  # None = H ** -0.5
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap)
) -> jax.Array:
    """Causal (optionally sliding-window, segment-masked, soft-capped) attention with the
    splash kernel."""
    B, T, N, H = q.shape
    rep = N // k.shape[2]
    kern, SegmentIds = _kernel(T, N, window, softcap, jax.default_backend() != "tpu")
    scale = H**-0.5 if scale is None else scale
    qt = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, N, T, H]; splash: no scale
    kt = jnp.swapaxes(jnp.repeat(k, rep, axis=2), 1, 2)  # [B, N, T, H]
    vt = jnp.swapaxes(jnp.repeat(v, rep, axis=2), 1, 2)
    if segment_ids is None:
        out = jax.vmap(kern)(qt, kt, vt)  # [B, N, T, H]
    else:
        seg = segment_ids.astype(jnp.int32)
        out = jax.vmap(kern)(qt, kt, vt, SegmentIds(q=seg, kv=seg))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)  # [B, T, N, H]
