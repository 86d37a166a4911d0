"""Gemma 2 and Gemma 3 (text: `Gemma3ForCausalLM`, model_type gemma3_text) <-> lm_jax.

Both are Llama-layout decoders (`lm_jax.convert.hf_decoder`) with
    RMSNorm (1 + w), w stored zero-centred          -> norm_unit_offset=True (a plain copy)
    embeddings times sqrt(hidden_size)              -> embed_scale=True
    four norms per layer (pre and post attn / MLP)  -> post_norms=True
    scores scaled by query_pre_attn_scalar ** -0.5  -> query_pre_attn_scalar
    GELU-tanh gated MLP (hidden_activation)         -> activation="gelu_tanh", gated_mlp=True
    `layer_types` of sliding and full layers        -> sliding_window, layer_types
Gemma 2 adds attn_logit_softcapping / final_logit_softcapping -> attn_softcap / final_softcap
(one RoPE for all layers). Gemma 3 adds q/k RMSNorms (qk_norm=True) and RoPE per layer kind:
rope_parameters["full_attention"] (rope_theta 1e6, optionally linear scaling) -> rope_theta /
rope_scaling, rope_parameters["sliding_attention"] (10000, unscaled) -> rope_local_theta
(4.x configs: rope_theta, rope_scaling, rope_local_base_freq, sliding_window_pattern).
transformers' Gemma 3 never applies attn_logit_softcapping (only final_logit_softcapping), so
neither does the conversion. Refused: attention_bias, use_bidirectional_attention, scaled
sliding-layer RoPE.
"""

from __future__ import annotations

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.convert.hf_common import (
    _ACT_TO_HF,
    Architecture,
    _activation,
    _layer_kinds_from_hf,
    _layer_kinds_to_hf,
    family_switches,
)
from lm_jax.convert.hf_decoder import decoder_params_from_hf, decoder_params_to_hf
from lm_jax.convert.hf_llama import _rope_from_hf, rope_scaling_from_hf, rope_scaling_to_hf

_GEMMA = {"norm_unit_offset", "embed_scale", "post_norms"}


def _default_types(d: dict, gemma3: bool) -> list[str]:
    """transformers' default `layer_types`: Gemma 2 alternates sliding / full, Gemma 3 has
    `sliding_window_pattern` - 1 sliding layers, then a full one."""
    period = int(d.get("sliding_window_pattern", 6)) if gemma3 else 2
    L = d["num_hidden_layers"]
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(L)]


def _gemma3_rope(d: dict) -> tuple[float, object, float]:
    """(global theta, global scaling, local theta) from Gemma 3 rope settings."""
    rp = d.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:  # transformers 4.x keys
        full = {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta")}
        local = {"rope_theta": d.get("rope_local_base_freq")}
    if rope_scaling_from_hf(local) is not None:
        raise ConfigError(
            f"Gemma 3 sliding-layer RoPE scaling {local!r} is not supported: lm_jax's local "
            "layers use rope_local_theta unscaled."
        )
    theta, local_theta = full.get("rope_theta"), local.get("rope_theta")
    return (
        1e6 if theta is None else float(theta),
        rope_scaling_from_hf(full),
        1e4 if local_theta is None else float(local_theta),
    )


def _gemma_config(d: dict, gemma3: bool) -> ModelConfig:
    for key in ("attention_bias", "use_bidirectional_attention"):
        if d.get(key):
            raise ConfigError(f"Gemma {key}=True is not supported by lm_jax.")
    D, N = d["hidden_size"], d["num_attention_heads"]
    window, types = _layer_kinds_from_hf(
        d.get("layer_types") or _default_types(d, gemma3),
        d.get("sliding_window"),
        d["num_hidden_layers"],
    )
    if gemma3:
        theta, scaling, local_theta = _gemma3_rope(d)
    else:
        (theta, scaling), local_theta = _rope_from_hf(d), None
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    head_dim = d.get("head_dim") or D // N
    return ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=D,
        num_layers=d["num_hidden_layers"],
        num_heads=N,
        num_kv_heads=d.get("num_key_value_heads") or N,
        head_dim=head_dim,
        mlp_dim=d["intermediate_size"],
        max_len=d["max_position_embeddings"],
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=_activation(act),
        gated_mlp=True,
        use_bias=False,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        sliding_window=window,
        layer_types=types,
        rope_local_theta=local_theta,
        qk_norm=gemma3,
        norm_unit_offset=True,
        embed_scale=True,
        post_norms=True,
        attn_softcap=None if gemma3 else d.get("attn_logit_softcapping"),
        final_softcap=d.get("final_logit_softcapping"),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or head_dim),
        initializer_range=d.get("initializer_range", 0.02),
    )


def _rope_to_hf(cfg: ModelConfig, theta: float, scaled: bool) -> dict:
    rs = rope_scaling_to_hf(cfg.rope_scaling) if scaled else None
    return {**(rs or {"rope_type": "default"}), "rope_theta": theta}


def _gemma_config_to_hf(cfg: ModelConfig, gemma3: bool) -> dict:
    local = cfg.local_layers
    d = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim_,
        "intermediate_size": cfg.mlp_dim_,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": {"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar or cfg.head_dim_),
        # transformers needs a window even with no sliding layers (then it is unused)
        "sliding_window": cfg.sliding_window if any(local) else cfg.max_len,
        "layer_types": _layer_kinds_to_hf(cfg),
        "final_logit_softcapping": cfg.final_softcap,
        "attn_logit_softcapping": cfg.attn_softcap,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
    }
    if not gemma3:
        d["rope_parameters"] = _rope_to_hf(cfg, cfg.rope_theta, scaled=True)
        d["rope_theta"] = cfg.rope_theta  # transformers 4.x
        return d
    local_theta = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    d["rope_parameters"] = {
        "full_attention": _rope_to_hf(cfg, cfg.rope_theta, scaled=True),
        "sliding_attention": _rope_to_hf(cfg, local_theta, scaled=False),
    }
    return d


def _gemma_accepts(cfg: ModelConfig, gemma3: bool) -> bool:
    on = family_switches(cfg) - {"mixed_layers", "final_softcap", "query_pre_attn_scalar"}
    if gemma3:
        # without rope_local_theta, local layers would share the global rope_scaling, which
        # transformers' Gemma 3 cannot express
        shared_scaling = cfg.rope_local_theta is None and cfg.rope_scaling is not None
        ok = on - {"rope_local_theta"} == _GEMMA | {"qk_norm"}
        ok = ok and not (shared_scaling and any(cfg.local_layers))
    else:
        ok = on - {"attn_softcap"} == _GEMMA
    return (
        ok
        and cfg.position == "rope"
        and cfg.norm == "rmsnorm"
        and cfg.gated_mlp
        and cfg.activation in _ACT_TO_HF
        and not cfg.use_bias
        and cfg.d_model % cfg.num_heads == 0  # transformers' Gemma configs require it
        and float(cfg.query_pre_attn_scalar or 0).is_integer()  # an int in transformers
        and cfg.moe is None
    )


GEMMA2 = Architecture(
    "gemma2",
    "Gemma2ForCausalLM",
    lambda d: _gemma_config(d, gemma3=False),
    decoder_params_from_hf,
    lambda c: _gemma_config_to_hf(c, gemma3=False),
    decoder_params_to_hf,
    lambda c: _gemma_accepts(c, gemma3=False),
)

GEMMA3 = Architecture(
    "gemma3_text",
    "Gemma3ForCausalLM",
    lambda d: _gemma_config(d, gemma3=True),
    decoder_params_from_hf,
    lambda c: _gemma_config_to_hf(c, gemma3=True),
    decoder_params_to_hf,
    lambda c: _gemma_accepts(c, gemma3=True),
)
