"""Model FLOPs per token (PaLM appendix B convention) and accelerator peaks, for MFU."""

from __future__ import annotations

import jax

from lm_jax.configs.base import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity).
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (active experts only; output head)."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim_
    attn = D * N * H * 2 + D * K * H * 2  # q, o and k, v
    mlp_mats = 3 if cfg.gated_mlp else 2
    dense_mlp = mlp_mats * D * cfg.mlp_dim_
    if cfg.moe is None:
        mlp = [dense_mlp] * cfg.num_layers
    else:
        m = cfg.moe
        F = m.expert_mlp_dim or cfg.mlp_dim_
        moe = mlp_mats * D * F * (m.top_k + m.num_shared_experts) + D * m.num_experts
        mlp = [moe if (i % m.every == m.every - 1) else dense_mlp for i in range(cfg.num_layers)]
    return cfg.num_layers * attn + sum(mlp) + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """6N + 12 L T D (training; forward only: 2N + 4 L T D), attention scores included.

    With a sliding window W < T the attention term uses W in the local layers.
    """
    W = cfg.sliding_window
    spans = [min(seq_len, W) if local else seq_len for local in cfg.local_layers]
    attn = sum(spans) * cfg.num_heads * cfg.head_dim_
    n = matmul_params(cfg)
    return (6 * n + 12 * attn) if training else (2 * n + 4 * attn)


def device_peak_flops(device=None) -> float | None:
    """Vendor dense bf16 peak of the device, or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None
