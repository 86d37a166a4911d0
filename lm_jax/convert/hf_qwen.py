"""Qwen2 and Qwen3 <-> lm_jax. Both are Llama with:

    Qwen2: biases on q/k/v, none on o_proj or the MLP       -> qkv_bias=True
    Qwen3: RMSNorm over head_dim on q and k before RoPE     -> qk_norm=True (head_dim is free)
    both: `use_sliding_window` + `sliding_window` on the layers `layer_types` marks
          "sliding_attention" (4.x configs: layers >= `max_window_layers`) -> sliding_window,
          layer_types ("local" / "global"; None when all layers are alike)

Weights: the Llama layout (`lm_jax.convert.hf_decoder`). Refused: Qwen3 `attention_bias=True`
(biases on q/k/v *and* o_proj), MoE variants (other model_types)."""

from __future__ import annotations

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.convert.hf_common import (
    Architecture,
    _layer_kinds_from_hf,
    _layer_kinds_to_hf,
    family_switches,
)
from lm_jax.convert.hf_decoder import decoder_params_from_hf, decoder_params_to_hf
from lm_jax.convert.hf_llama import _llama_config, _llama_config_to_hf


def _qwen_layer_kinds(d: dict) -> tuple[int | None, tuple[str, ...] | None]:
    L = d["num_hidden_layers"]
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    types = d.get("layer_types")
    if types is None:  # transformers 4.x: sliding from layer max_window_layers on
        first = d.get("max_window_layers", L)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(L)]
    return _layer_kinds_from_hf(types, window, L)


def _qwen_config(d: dict, qwen3: bool) -> ModelConfig:
    if qwen3 and d.get("attention_bias"):
        raise ConfigError(
            "Qwen3 attention_bias=True (biases on q/k/v and o_proj) is not supported: lm_jax has "
            "qkv_bias (q/k/v only) and use_bias (every projection and the MLP)."
        )
    base = _llama_config({**d, "attention_bias": False, "mlp_bias": False})
    window, types = _qwen_layer_kinds(d)
    return base.replace(sliding_window=window, layer_types=types, qkv_bias=not qwen3, qk_norm=qwen3)


def _qwen_config_to_hf(cfg: ModelConfig, qwen3: bool) -> dict:
    d = _llama_config_to_hf(cfg)
    del d["mlp_bias"]
    if qwen3:
        d["attention_bias"] = False
    else:
        del d["attention_bias"]  # Qwen2: always on q/k/v
    local = cfg.local_layers
    d.update(
        use_sliding_window=any(local),
        sliding_window=cfg.sliding_window if any(local) else None,
        max_window_layers=local.index(True) if any(local) else cfg.num_layers,
        layer_types=_layer_kinds_to_hf(cfg),
    )
    return d


def _qwen_accepts(cfg: ModelConfig, qwen3: bool) -> bool:
    own = {"qk_norm"} if qwen3 else {"qkv_bias"}
    return (
        family_switches(cfg) - {"mixed_layers"} == own
        and cfg.position == "rope"
        and cfg.norm == "rmsnorm"
        and cfg.gated_mlp
        and not cfg.use_bias
        and cfg.moe is None
    )


QWEN2 = Architecture(
    "qwen2",
    "Qwen2ForCausalLM",
    lambda d: _qwen_config(d, qwen3=False),
    decoder_params_from_hf,
    lambda c: _qwen_config_to_hf(c, qwen3=False),
    decoder_params_to_hf,
    lambda c: _qwen_accepts(c, qwen3=False),
)

QWEN3 = Architecture(
    "qwen3",
    "Qwen3ForCausalLM",
    lambda d: _qwen_config(d, qwen3=True),
    decoder_params_from_hf,
    lambda c: _qwen_config_to_hf(c, qwen3=True),
    decoder_params_to_hf,
    lambda c: _qwen_accepts(c, qwen3=True),
)
