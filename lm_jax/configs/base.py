"""Typed configuration dataclasses. `ModelConfig` reaches modules; `TrainConfig` never does."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from lm_jax.configs.lora import LoraConfig
from lm_jax.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: Llama-3 style frequency-dependent (HF `rope_type="llama3"`), or
    `rope_type="linear"` (every frequency / factor; Gemma 3's global layers)."""

    factor: float = 8.0  # context extension factor
    low_freq_factor: float = (
        1.0  # wavelengths above original/low_freq_factor are scaled by 1/factor
    )
    high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are unchanged
    original_max_len: int = 8192  # the pretraining context length
    # linear: only `factor` is used; factors: each inverse frequency divided by its own entry of
    # `factors` [head_dim / 2] (a GGUF's rope_freqs tensor, as llama.cpp applies it)
    rope_type: Literal["llama3", "linear", "factors"] = "llama3"
    factors: tuple[float, ...] | None = None

    def __post_init__(self):
        _check(
            self.rope_type in ("llama3", "linear", "factors"),
            "rope_scaling.rope_type must be 'llama3', 'linear' or 'factors', got "
            f"{self.rope_type!r}.",
        )
        _check(self.factor > 0, f"rope_scaling.factor must be > 0, got {self.factor}.")
        if self.factors is not None:
            object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        _check(
            (self.rope_type == "factors")
            == (self.factors is not None and len(self.factors) > 0),
            "rope_scaling.factors (one per frequency) go with rope_type='factors', only with it.",
        )
        _check(
            self.factors is None or all(f > 0 for f in self.factors),
            "rope_scaling.factors must all be > 0.",
        )


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward settings (see `lm_jax.nn.moe`)."""

    num_experts: int = 8  # E
    top_k: int = 2  # experts per token (token choice)
    router: Literal["softmax_topk", "topk_softmax", "expert_choice"] = "softmax_topk"
    renormalize: bool = True  # softmax_topk: top-k weights sum to 1 (Mixtral); False = Switch
    dispatch: Literal["dropless", "capacity"] = "dropless"
    # dropless grouped matmul: ragged_dot (a grouped GEMM on GPU/TPU; a dense loop on XLA:CPU),
    # block_padded (groups padded to `grouped_matmul_block` rows, one batched matmul), or auto
    # (block_padded on CPU, ragged_dot elsewhere). Both are exact; see `lm_jax.nn.moe`.
    grouped_matmul: Literal["auto", "ragged_dot", "block_padded"] = "auto"
    grouped_matmul_block: int = 128  # CPU step: 128 rows beat 32, 64 and 256 (RESULTS.md)
    # block_padded: when every expert's rows fit R / E of the worst-case buffer of R rows, give
    # expert e the fixed rows [e R/E, (e+1) R/E) and multiply by the kernels as stored (no
    # per-block gathers); exact either way, chosen per layer and step under lax.cond.
    dropless_fast_path: bool = True
    capacity_factor_train: float = 1.25  # capacity = factor * tokens * top_k / E
    capacity_factor_eval: float = 2.0
    num_shared_experts: int = 0  # DeepSeekMoE shared experts, always active
    expert_mlp_dim: int | None = None  # F per expert; defaults to ModelConfig.mlp_dim
    jitter_noise: float = 0.0  # multiplicative router-input jitter in training (Switch)
    load_balance_coef: float = 0.01  # Switch load-balancing loss coefficient
    router_z_coef: float = 0.001  # ST-MoE router z-loss coefficient
    every: int = 1  # MoE in every k-th layer (layer index % every == every - 1)

    def __post_init__(self):
        _check(self.num_experts > 0, f"moe.num_experts must be > 0, got {self.num_experts}.")
        _check(
            0 < self.top_k <= self.num_experts,
            f"moe.top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}].",
        )
        _check(
            self.capacity_factor_train > 0 and self.capacity_factor_eval > 0,
            "moe.capacity_factor_train/eval must be > 0, got "
            f"{self.capacity_factor_train}/{self.capacity_factor_eval}.",
        )
        _check(
            self.router in ("softmax_topk", "topk_softmax", "expert_choice"),
            f"moe.router must be softmax_topk, topk_softmax or expert_choice, got {self.router!r}.",
        )
        _check(
            self.dispatch in ("dropless", "capacity"),
            f"moe.dispatch must be 'dropless' or 'capacity', got {self.dispatch!r}.",
        )
        _check(
            self.grouped_matmul in ("auto", "ragged_dot", "block_padded"),
            "moe.grouped_matmul must be 'auto', 'ragged_dot' or 'block_padded', got "
            f"{self.grouped_matmul!r}.",
        )
        _check(
            self.grouped_matmul_block >= 1,
            f"moe.grouped_matmul_block must be >= 1, got {self.grouped_matmul_block}.",
        )
        _check(
            self.router != "expert_choice" or self.dispatch == "capacity",
            "moe.router='expert_choice' gives every expert a fixed capacity: set "
            "moe.dispatch='capacity' (capacity_factor_* set C).",
        )
        _check(self.num_shared_experts >= 0, "moe.num_shared_experts must be >= 0.")
        _check(
            self.expert_mlp_dim is None or self.expert_mlp_dim > 0,
            f"moe.expert_mlp_dim must be None or > 0, got {self.expert_mlp_dim}.",
        )
        _check(0.0 <= self.jitter_noise < 1.0, "moe.jitter_noise must be in [0, 1).")
        _check(
            self.load_balance_coef >= 0 and self.router_z_coef >= 0,
            "moe.load_balance_coef and moe.router_z_coef must be >= 0.",
        )
        _check(self.every >= 1, f"moe.every must be >= 1, got {self.every}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Transformer. Covers GPT-2 style and Llama/Mistral style models."""

    vocab_size: int = 256  # V
    d_model: int = 64  # D
    num_layers: int = 2  # L
    num_heads: int = 4  # N
    num_kv_heads: int | None = None  # K; None = N (MHA), 1 = MQA
    head_dim: int | None = None  # H; None = D // N
    mlp_dim: int | None = None  # F; None = 4 * D
    max_len: int = 256  # longest sequence (positions, KV cache)
    # Architecture family switches.
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Literal["gelu_tanh", "gelu", "silu", "relu", "quick_gelu"] = "silu"
    gated_mlp: bool = True  # SwiGLU-style gate_proj * up_proj
    use_bias: bool = False  # biases on attention and MLP projections (GPT-2: True)
    position: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    sliding_window: int | None = None  # attend to at most this many past positions (Mistral)
    # Per-layer attention kinds, "global" or "local" (local: `sliding_window`); None = every
    # layer local when sliding_window is set, else global. Gemma 2 alternates, Gemma 3 has five
    # local layers per global one.
    layer_types: tuple[str, ...] | None = None  # each "global" or "local"
    rope_local_theta: float | None = None  # RoPE base of local layers, unscaled (Gemma 3)
    # Qwen / Gemma switches; the defaults are the Llama / GPT-2 maths.
    qkv_bias: bool = False  # biases on q/k/v only, o_proj without (Qwen2); see also use_bias
    qk_norm: bool = False  # norm over head_dim on q and k, before RoPE (Qwen3, Gemma 3)
    norm_unit_offset: bool = False  # RMSNorm applies (1 + scale), scale zero-init (Gemma)
    embed_scale: bool = False  # token embeddings times sqrt(d_model), compute dtype (Gemma)
    post_norms: bool = False  # norm attention / MLP outputs before the residual (Gemma 2/3)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5; None: head_dim
    moe: MoEConfig | None = None  # None = dense MLP in every layer
    lora: LoraConfig | None = None  # LoRA adapters on targeted projections (lm_jax.configs.lora)
    # Numerics and execution.
    dtype: str = "float32"  # compute dtype of matmuls (softmax, norms, loss stay float32)
    param_dtype: str = "float32"
    # attention kernel: xla | cudnn (NVIDIA) | splash (Pallas, TPU) | auto; see lm_jax.nn.splash
    attention_impl: Literal["xla", "cudnn", "splash", "auto"] = "xla"
    # xla causal attention: query rows per block; key blocks above the diagonal are skipped
    # (0 = one block, the full [T, T] scores)
    attention_q_block: int = 64
    remat: Literal["none", "dots", "full"] = "none"  # rematerialisation policy per layer
    scan_unroll: int = 1  # layers unrolled per scan step; num_layers = no loop (faster on CPU)
    dropout: float = 0.0  # residual/attention-output dropout (training only)
    initializer_range: float = 0.02  # std of normal init

    def __post_init__(self):
        _check(self.vocab_size > 0, f"vocab_size must be > 0, got {self.vocab_size}.")
        _check(self.d_model > 0 and self.num_layers > 0, "d_model and num_layers must be > 0.")
        _check(self.num_heads > 0, f"num_heads must be > 0, got {self.num_heads}.")
        _check(
            self.kv_heads > 0 and self.num_heads % self.kv_heads == 0,
            f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.kv_heads}); "
            "set num_kv_heads to a divisor of num_heads (1 for MQA).",
        )
        _check(
            self.head_dim is not None or self.d_model % self.num_heads == 0,
            f"d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads}); "
            "set head_dim explicitly or change d_model.",
        )
        _check(
            self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}."
        )
        _check(
            self.param_dtype in _DTYPES,
            f"param_dtype must be one of {sorted(_DTYPES)}, got {self.param_dtype!r}.",
        )
        _check(
            self.position != "rope" or self.head_dim_ % 2 == 0,
            f"RoPE needs an even head_dim, got {self.head_dim_}.",
        )
        _check(
            self.sliding_window is None or self.sliding_window > 0,
            f"sliding_window must be None or > 0, got {self.sliding_window}.",
        )
        self._check_layer_kinds()
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}.")
        _check(self.max_len > 0, f"max_len must be > 0, got {self.max_len}.")
        _check(self.scan_unroll >= 1, f"scan_unroll must be >= 1, got {self.scan_unroll}.")
        _check(
            self.attention_q_block >= 0,
            f"attention_q_block must be >= 0 (0 = no blocks), got {self.attention_q_block}.",
        )
        _check(
            self.attention_impl in ("xla", "cudnn", "splash", "auto"),
            "attention_impl must be 'xla', 'cudnn', 'splash' or 'auto', got "
            f"{self.attention_impl!r}.",
        )
        if self.moe is not None:
            m = self.moe
            _check(
                1 <= m.every <= self.num_layers and self.num_layers % m.every == 0,
                f"moe.every ({m.every}) must divide num_layers ({self.num_layers}).",
            )

    def _check_layer_kinds(self) -> None:
        if isinstance(self.layer_types, list):  # from JSON; a tuple keeps the config hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        lt = self.layer_types
        if lt is not None:
            _check(
                len(lt) == self.num_layers and set(lt) <= {"global", "local"},
                f"layer_types must list 'global' or 'local' for each of the {self.num_layers} "
                f"layers, got {lt!r}.",
            )
            _check(
                "local" not in lt or self.sliding_window is not None,
                "layer_types has 'local' layers but sliding_window is None: set sliding_window.",
            )
        _check(
            self.rope_local_theta is None
            or (self.position == "rope" and self.rope_local_theta > 0),
            f"rope_local_theta ({self.rope_local_theta}) needs position='rope' and a value > 0.",
        )
        _check(
            not self.norm_unit_offset or self.norm == "rmsnorm",
            "norm_unit_offset (Gemma's 1 + scale) needs norm='rmsnorm'.",
        )
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"{name} must be None or > 0, got {v}.")

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window? [L]"""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "local" for t in self.layer_types)

    @property
    def mixed_layers(self) -> bool:
        """Local and global layers both present: the scan carries a per-layer flag."""
        return len(set(self.local_layers)) > 1

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def mlp_dim_(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.d_model

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("moe") is not None:
            d["moe"] = MoEConfig(**d["moe"])
        if isinstance(d.get("lora"), dict):
            d["lora"] = LoraConfig.from_dict(d["lora"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown ModelConfig fields {sorted(unknown)}.")
        return cls(**d)


def gpt2_style(**kw) -> ModelConfig:
    """GPT-2 family: learned positions, LayerNorm, GELU MLP, biases, tied embeddings."""
    base = dict(
        norm="layernorm",
        activation="gelu_tanh",
        gated_mlp=False,
        use_bias=True,
        position="learned",
        tie_embeddings=True,
        norm_eps=1e-5,
    )
    base.update(kw)
    return ModelConfig(**base)


def llama_style(**kw) -> ModelConfig:
    """Llama family: RoPE, RMSNorm, SwiGLU, GQA, no biases."""
    base = dict(
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        use_bias=False,
        position="rope",
    )
    base.update(kw)
    return ModelConfig(**base)


def with_model_from_dict(cls, d: dict):
    """`cls(**d)` for a config dataclass holding a `ModelConfig` as `model` (EncoderConfig,
    T5Config), the nested dict rebuilt; an unknown field is a ConfigError naming it."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}.")
    if isinstance(d.get("model"), dict):
        d["model"] = ModelConfig.from_dict(d["model"])
    return cls(**d)
