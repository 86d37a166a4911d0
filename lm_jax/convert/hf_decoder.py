"""The Llama-layout decoder weights that Qwen2, Qwen3, Gemma 2 and Gemma 3 share <-> lm_jax
params, with each family's extras read off the `ModelConfig`:

    model.embed_tokens.weight [V, D]                   -> embed_tokens/embedding
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   -> layers/attn/{q,k,v,o}_proj/kernel
        [out, in] (torch Linear: transposed); .bias    -> .../bias (qkv_bias: q/k/v only)
    model.layers.{i}.self_attn.{q,k}_norm.weight [H]   -> layers/attn/{q,k}_norm/scale (qk_norm)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    -> layers/mlp/{gate,up,down}_proj/kernel
    norms, Llama / Qwen: input_layernorm -> attn_norm, post_attention_layernorm -> mlp_norm;
    Gemma (post_norms): input_layernorm -> attn_norm, post_attention_layernorm ->
        attn_post_norm, pre_feedforward_layernorm -> mlp_norm, post_feedforward_layernorm ->
        mlp_post_norm
    model.norm.weight -> norm/scale; lm_head.weight [V, D] -> lm_head/kernel (untied only)

Gemma stores its RMSNorm weights as offsets from 1, as `norm_unit_offset` does: a plain copy.
"""

from __future__ import annotations

import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.convert.hf_common import Params, StateDict, _get, _stack, _unstack

LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
GEMMA_NORMS = {
    "attn_norm": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}
_LAYER = "model.layers.{}."


def _norm_names(cfg: ModelConfig) -> dict[str, str]:
    return GEMMA_NORMS if cfg.post_norms else LLAMA_NORMS


def _linears(cfg: ModelConfig) -> dict[str, tuple[str, int, int, bool]]:
    """ours -> (HF name, in, out, bias) for the seven projections."""
    D, F = cfg.d_model, cfg.mlp_dim_
    NH, KH = cfg.num_heads * cfg.head_dim_, cfg.kv_heads * cfg.head_dim_
    qkv_bias, bias = cfg.use_bias or cfg.qkv_bias, cfg.use_bias
    return {
        "attn/q_proj": ("self_attn.q_proj", D, NH, qkv_bias),
        "attn/k_proj": ("self_attn.k_proj", D, KH, qkv_bias),
        "attn/v_proj": ("self_attn.v_proj", D, KH, qkv_bias),
        "attn/o_proj": ("self_attn.o_proj", NH, D, bias),
        "mlp/gate_proj": ("mlp.gate_proj", D, F, bias),
        "mlp/up_proj": ("mlp.up_proj", D, F, bias),
        "mlp/down_proj": ("mlp.down_proj", F, D, bias),
    }


def decoder_params_from_hf(cfg: ModelConfig, sd: StateDict) -> Params:
    """lm_jax params (numpy, layers stacked [L, ...]) from a Llama-layout state dict."""
    V, D, L, H = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.head_dim_
    layers: dict = {"attn": {}, "mlp": {}}
    for ours, (name, n_in, n_out, bias) in _linears(cfg).items():
        group, proj = ours.split("/")
        w = _stack(sd, _LAYER + name + ".weight", L, (n_out, n_in), transpose=True)
        layers[group][proj] = {"kernel": w}
        if bias:
            layers[group][proj]["bias"] = _stack(sd, _LAYER + name + ".bias", L, (n_out,))
    if cfg.qk_norm:
        for n in ("q_norm", "k_norm"):
            layers["attn"][n] = {"scale": _stack(sd, _LAYER + f"self_attn.{n}.weight", L, (H,))}
    for ours, name in _norm_names(cfg).items():
        layers[ours] = {"scale": _stack(sd, _LAYER + name + ".weight", L, (D,))}
    params = {
        "embed_tokens": {"embedding": _get(sd, "model.embed_tokens.weight", (V, D))},
        "layers": layers,
        "norm": {"scale": _get(sd, "model.norm.weight", (D,))},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": _get(sd, "lm_head.weight", (V, D)).T}
    return params


def decoder_params_to_hf(cfg: ModelConfig, p: Params) -> dict[str, np.ndarray]:
    """The Llama-layout state dict of lm_jax params (the inverse of `decoder_params_from_hf`)."""
    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"]}
    lay = p["layers"]
    for ours, (name, _, _, bias) in _linears(cfg).items():
        group, proj = ours.split("/")
        _unstack(lay[group][proj]["kernel"], _LAYER + name + ".weight", sd, transpose=True)
        if bias:
            _unstack(lay[group][proj]["bias"], _LAYER + name + ".bias", sd)
    if cfg.qk_norm:
        for n in ("q_norm", "k_norm"):
            _unstack(lay["attn"][n]["scale"], _LAYER + f"self_attn.{n}.weight", sd)
    for ours, name in _norm_names(cfg).items():
        _unstack(lay[ours]["scale"], _LAYER + name + ".weight", sd)
    sd["model.norm.weight"] = p["norm"]["scale"]
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = p["lm_head"]["kernel"].T
    return sd
