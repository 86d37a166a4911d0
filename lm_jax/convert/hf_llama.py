"""Llama and Mistral <-> lm_jax: config (RoPE scaling: llama3 or linear) and weights (torch
Linear: transposed)."""

from __future__ import annotations

import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig, RopeScaling
from lm_jax.convert.hf_common import (
    Architecture,
    Params,
    StateDict,
    _activation,
    _get,
    _stack,
    _unstack,
    family_switches,
)


def rope_scaling_from_hf(rs: dict) -> RopeScaling | None:
    """RopeScaling from one HF rope dict (`rope_type` default / llama3 / linear)."""
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(factor=float(rs["factor"]), rope_type="linear")
    if kind != "llama3":
        raise ConfigError(
            f"unsupported rope scaling type {kind!r}: lm_jax supports none ('default'), "
            "'linear' and 'llama3' (lm_jax.configs.RopeScaling)."
        )
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_len=int(rs["original_max_position_embeddings"]),
    )


def rope_scaling_to_hf(s: RopeScaling | None) -> dict | None:
    """The HF rope-scaling dict (no theta) of `s`; None when unscaled."""
    if s is None:
        return None
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    if s.rope_type == "factors":
        raise ConfigError(
            "per-frequency RoPE factors (from a GGUF's rope_freqs) have no Hugging Face "
            "rope_scaling form: export to GGUF or keep the lm_jax checkpoint"
        )
    return {
        "rope_type": "llama3",
        "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_len,
    }


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    rp = d.get("rope_parameters") or {}
    theta = rp.get("rope_theta", d.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    return theta, rope_scaling_from_hf(d.get("rope_scaling") or rp)


def _llama_config(d: dict) -> ModelConfig:
    attn_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ConfigError(
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported: lm_jax has "
            "one use_bias switch for both."
        )
    theta, scaling = _rope_from_hf(d)
    D, N = d["hidden_size"], d["num_attention_heads"]
    window = d.get("sliding_window") if d.get("model_type") == "mistral" else None
    return ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=D,
        num_layers=d["num_hidden_layers"],
        num_heads=N,
        num_kv_heads=d.get("num_key_value_heads") or N,
        head_dim=d.get("head_dim") or D // N,
        mlp_dim=d["intermediate_size"],
        max_len=d["max_position_embeddings"],
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=_activation(d.get("hidden_act", "silu")),
        gated_mlp=True,
        use_bias=attn_bias,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=window,
        initializer_range=d.get("initializer_range", 0.02),
    )


def _llama_params(cfg: ModelConfig, sd: StateDict) -> Params:
    V, D, L, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.mlp_dim_
    NH, KH = cfg.num_heads * cfg.head_dim_, cfg.kv_heads * cfg.head_dim_
    h = "model.layers.{}."

    def linear(name, n_in, n_out):
        out = {"kernel": _stack(sd, h + name + ".weight", L, (n_out, n_in), transpose=True)}
        if cfg.use_bias:
            out["bias"] = _stack(sd, h + name + ".bias", L, (n_out,))
        return out

    params = {
        "embed_tokens": {"embedding": _get(sd, "model.embed_tokens.weight", (V, D))},
        "layers": {
            "attn_norm": {"scale": _stack(sd, h + "input_layernorm.weight", L, (D,))},
            "mlp_norm": {"scale": _stack(sd, h + "post_attention_layernorm.weight", L, (D,))},
            "attn": {
                "q_proj": linear("self_attn.q_proj", D, NH),
                "k_proj": linear("self_attn.k_proj", D, KH),
                "v_proj": linear("self_attn.v_proj", D, KH),
                "o_proj": linear("self_attn.o_proj", NH, D),
            },
            "mlp": {
                "gate_proj": linear("mlp.gate_proj", D, F),
                "up_proj": linear("mlp.up_proj", D, F),
                "down_proj": linear("mlp.down_proj", F, D),
            },
        },
        "norm": {"scale": _get(sd, "model.norm.weight", (D,))},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": _get(sd, "lm_head.weight", (V, D)).T}
    return params


def _llama_accepts(cfg: ModelConfig) -> bool:
    return (
        not family_switches(cfg)
        and cfg.position == "rope"
        and cfg.norm == "rmsnorm"
        and cfg.gated_mlp
        and not any(cfg.local_layers)
        and cfg.moe is None
    )


def _mistral_accepts(cfg: ModelConfig) -> bool:
    """Every layer local (Mistral's window applies to all of them)."""
    return (
        all(cfg.local_layers)
        and _llama_accepts(cfg.replace(sliding_window=None, layer_types=None))
        and cfg.rope_scaling is None
    )


def _llama_config_to_hf(cfg: ModelConfig) -> dict:
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = rope_scaling_to_hf(cfg.rope_scaling)
    if rope_scaling is not None:
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim_,
        "intermediate_size": cfg.mlp_dim_,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation),
        "attention_bias": cfg.use_bias,
        "mlp_bias": cfg.use_bias,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling.
        "rope_parameters": rope_parameters,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
    }


def _mistral_config_to_hf(cfg: ModelConfig) -> dict:
    d = _llama_config_to_hf(cfg)
    del d["attention_bias"], d["mlp_bias"]  # MistralConfig has no biases
    d["sliding_window"] = cfg.sliding_window
    return d


def _llama_params_to_hf(cfg: ModelConfig, p: Params) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    lay, h = p["layers"], "model.layers.{}."
    sd["model.embed_tokens.weight"] = p["embed_tokens"]["embedding"]
    for group, names, prefix in (
        ("attn", ("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn."),
        ("mlp", ("gate_proj", "up_proj", "down_proj"), "mlp."),
    ):
        for n in names:
            _unstack(lay[group][n]["kernel"], h + prefix + n + ".weight", sd, transpose=True)
            if cfg.use_bias:
                _unstack(lay[group][n]["bias"], h + prefix + n + ".bias", sd)
    _unstack(lay["attn_norm"]["scale"], h + "input_layernorm.weight", sd)
    _unstack(lay["mlp_norm"]["scale"], h + "post_attention_layernorm.weight", sd)
    sd["model.norm.weight"] = p["norm"]["scale"]
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = p["lm_head"]["kernel"].T
    return sd


def _mistral_params(cfg: ModelConfig, sd: StateDict) -> Params:
    if cfg.use_bias:
        raise ConfigError("Mistral checkpoints have no biases; use model_type 'llama'.")
    return _llama_params(cfg, sd)


MISTRAL = Architecture(
    "mistral",
    "MistralForCausalLM",
    _llama_config,
    _mistral_params,
    _mistral_config_to_hf,
    _llama_params_to_hf,
    lambda c: not c.use_bias and _mistral_accepts(c),
)

LLAMA = Architecture(
    "llama",
    "LlamaForCausalLM",
    _llama_config,
    _llama_params,
    _llama_config_to_hf,
    _llama_params_to_hf,
    _llama_accepts,
)
