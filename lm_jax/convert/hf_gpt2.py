"""GPT-2 <-> lm_jax: config and weights (Conv1D kernels are already [in, out])."""

from __future__ import annotations

import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.convert.hf_common import (
    _ACT_TO_HF,
    Architecture,
    Params,
    StateDict,
    _activation,
    _get,
    _stack,
    _unstack,
    family_switches,
)


def _gpt2_config(d: dict) -> ModelConfig:
    for key, default in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
    ):
        if d.get(key, default) != default:
            raise ConfigError(f"GPT-2 config {key}={d[key]!r} is not supported (needs {default}).")
    return ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=d["n_embd"],
        num_layers=d["n_layer"],
        num_heads=d["n_head"],
        mlp_dim=d.get("n_inner"),
        max_len=d["n_positions"],
        norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        activation=_activation(d.get("activation_function", "gelu_new")),
        gated_mlp=False,
        use_bias=True,
        position="learned",
        tie_embeddings=d.get("tie_word_embeddings", True),
        initializer_range=d.get("initializer_range", 0.02),
    )


def _gpt2_params(cfg: ModelConfig, sd: StateDict) -> Params:
    if "wte.weight" in sd and "transformer.wte.weight" not in sd:  # saved from GPT2Model
        sd = {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in sd.items()}
    V, D, L, F, P = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.mlp_dim_, cfg.max_len
    h = "transformer.h.{}."
    c_attn_w = _stack(sd, h + "attn.c_attn.weight", L, (D, 3 * D))  # [L, D, 3D]
    c_attn_b = _stack(sd, h + "attn.c_attn.bias", L, (3 * D,))
    q_w, k_w, v_w = np.split(c_attn_w, 3, axis=-1)
    q_b, k_b, v_b = np.split(c_attn_b, 3, axis=-1)

    def norm(name):
        return {
            "scale": _stack(sd, h + name + ".weight", L, (D,)),
            "bias": _stack(sd, h + name + ".bias", L, (D,)),
        }

    def conv(name, n_in, n_out):
        return {
            "kernel": _stack(sd, h + name + ".weight", L, (n_in, n_out)),
            "bias": _stack(sd, h + name + ".bias", L, (n_out,)),
        }

    params = {
        "embed_tokens": {"embedding": _get(sd, "transformer.wte.weight", (V, D))},
        "embed_positions": _get(sd, "transformer.wpe.weight", (P, D)),
        "layers": {
            "attn_norm": norm("ln_1"),
            "mlp_norm": norm("ln_2"),
            "attn": {
                "q_proj": {"kernel": q_w, "bias": q_b},
                "k_proj": {"kernel": k_w, "bias": k_b},
                "v_proj": {"kernel": v_w, "bias": v_b},
                "o_proj": conv("attn.c_proj", D, D),
            },
            "mlp": {"up_proj": conv("mlp.c_fc", D, F), "down_proj": conv("mlp.c_proj", F, D)},
        },
        "norm": {
            "scale": _get(sd, "transformer.ln_f.weight", (D,)),
            "bias": _get(sd, "transformer.ln_f.bias", (D,)),
        },
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": _get(sd, "lm_head.weight", (V, D)).T}
    return params


def _gpt2_accepts(cfg: ModelConfig) -> bool:
    return (
        not family_switches(cfg)
        and cfg.position == "learned"
        and cfg.norm == "layernorm"
        and not cfg.gated_mlp
        and cfg.use_bias
        and cfg.kv_heads == cfg.num_heads
        and cfg.head_dim_ * cfg.num_heads == cfg.d_model
        and cfg.sliding_window is None
        and cfg.moe is None
    )


def _gpt2_config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_dim,
        "n_positions": cfg.max_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": _ACT_TO_HF[cfg.activation],
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        # GPT2Config defaults to GPT-2's 50256, which a smaller vocab does not have.
        **({} if cfg.vocab_size > 50256 else {"bos_token_id": None, "eos_token_id": None}),
    }


def _gpt2_params_to_hf(cfg: ModelConfig, p: Params) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    lay, h = p["layers"], "transformer.h.{}."
    sd["transformer.wte.weight"] = p["embed_tokens"]["embedding"]
    sd["transformer.wpe.weight"] = p["embed_positions"]
    a = lay["attn"]
    qkv_w = np.concatenate([a[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], -1)
    qkv_b = np.concatenate([a[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], -1)
    _unstack(qkv_w, h + "attn.c_attn.weight", sd)
    _unstack(qkv_b, h + "attn.c_attn.bias", sd)
    for ours, theirs in (
        (a["o_proj"], "attn.c_proj"),
        (lay["mlp"]["up_proj"], "mlp.c_fc"),
        (lay["mlp"]["down_proj"], "mlp.c_proj"),
    ):
        _unstack(ours["kernel"], h + theirs + ".weight", sd)
        _unstack(ours["bias"], h + theirs + ".bias", sd)
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        _unstack(lay[ours]["scale"], h + theirs + ".weight", sd)
        _unstack(lay[ours]["bias"], h + theirs + ".bias", sd)
    sd["transformer.ln_f.weight"] = p["norm"]["scale"]
    sd["transformer.ln_f.bias"] = p["norm"]["bias"]
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = p["lm_head"]["kernel"].T
    return sd


GPT2 = Architecture(
    "gpt2",
    "GPT2LMHeadModel",
    _gpt2_config,
    _gpt2_params,
    _gpt2_config_to_hf,
    _gpt2_params_to_hf,
    _gpt2_accepts,
)
