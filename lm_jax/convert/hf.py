"""Hugging Face transformers checkpoints <-> lm_jax (config, params).

`from_hf(model_or_dir)` reads a transformers PyTorch model object, or a local folder with
`config.json` and `*.safetensors` (read with `safetensors` into numpy: no torch needed), and
returns `(ModelConfig, params)` with params as numpy arrays in the checkpoint's dtype.
`to_hf(config, params, out_dir)` writes `config.json` + `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads.

Weight layouts (ours: kernels are `x @ kernel`, [in, out], stacked over layers as [L, ...]):
    GPT-2   transformer.wte.weight [V,D] -> embed_tokens/embedding; wpe [P,D] -> embed_positions
            h.{i}.attn.c_attn.weight [D,3D] (Conv1D: already [in,out]) -> q/k/v_proj, split in 3
            h.{i}.attn.c_proj / mlp.c_fc / mlp.c_proj (Conv1D) -> o_proj / up_proj / down_proj
            h.{i}.ln_1 / ln_2, ln_f -> attn_norm / mlp_norm, norm
    Llama   model.embed_tokens.weight [V,D]; model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
            [out,in] (torch Linear: transposed); mlp.{gate,up,down}_proj; input_layernorm ->
            attn_norm, post_attention_layernorm -> mlp_norm; model.norm; lm_head.weight [V,D]
    Mistral = Llama + sliding_window.
    Mixtral = Mistral attention + MoE (lm_jax.nn.moe; dropless, softmax top-k, renormalised):
            mlp.gate.weight [E,D] -> layers/mlp/router/kernel [L,D,E]; experts, in memory
            (transformers 5) mlp.experts.gate_up_proj [E,2F,D] -> experts/{gate_proj,up_proj}
            [L,E,D,F], mlp.experts.down_proj [E,D,F] -> experts/down_proj [L,E,F,D]; on disk
            (what `save_pretrained` and `to_hf` write, and 4.x reads) block_sparse_moe.gate and
            block_sparse_moe.experts.{j}.{w1 (gate), w3 (up), w2 (down)}.weight [F,D]/[D,F].
            router_aux_loss_coef <-> moe.load_balance_coef as is (transformers pools the load
            statistics over layers and counts top-k choices, lm_jax sums per-layer Switch losses:
            the same coefficient weighs the loss about L / top_k times more in lm_jax);
            router_jitter_noise <-> moe.jitter_noise (transformers also jitters the experts'
            input, lm_jax the router's only); router_z_coef = 0 (Mixtral has no z-loss).

Adding an architecture (e.g. Mixtral): write an `Architecture` (config and weight mapping both
ways) and `register_architecture("mixtral", ...)`; `from_hf` dispatches on `model_type`, and
`to_hf` picks the first registered architecture whose `accepts(cfg)` is true (or the
`model_type` it is given).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig, MoEConfig, RopeScaling

Params = dict[str, Any]
StateDict = Mapping[str, np.ndarray]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One transformers architecture: config and weight mapping, both directions."""

    model_type: str  # transformers `model_type`
    hf_class: str  # transformers class name, written to config.json `architectures`
    config_from_hf: Callable[[dict], ModelConfig]  # HF config dict -> ModelConfig
    params_from_hf: Callable[[ModelConfig, StateDict], Params]  # state dict -> params tree
    config_to_hf: Callable[[ModelConfig], dict]  # ModelConfig -> HF config dict
    params_to_hf: Callable[[ModelConfig, Params], dict[str, np.ndarray]]  # params -> state dict
    accepts: Callable[[ModelConfig], bool]  # to_hf: can this config be written as this type?


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add (or replace) a converter; `from_hf` dispatches on `arch.model_type`."""
    ARCHITECTURES[arch.model_type] = arch
    return arch


def _architecture(model_type: str | None) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"unsupported Hugging Face model_type {model_type!r}: lm_jax.convert supports "
            f"{sorted(ARCHITECTURES)}. Register a converter with "
            "lm_jax.convert.hf.register_architecture to add one."
        )
    return ARCHITECTURES[model_type]


# --------------------------------------------------------------------------- helpers


def _check_shape(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(arr.shape) != tuple(shape):
        raise ConfigError(
            f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)} from the "
            "config: the checkpoint does not match its config.json."
        )
    return arr


def _get(sd: StateDict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in sd:
        raise ConfigError(f"tensor {name!r} is missing from the checkpoint.")
    return _check_shape(name, np.asarray(sd[name]), shape)


def _stack(sd: StateDict, fmt: str, L: int, shape: tuple[int, ...], transpose=False):
    """Stack per-layer tensors `fmt.format(i)` into [L, ...]; torch Linear weights transposed."""
    out = []
    for i in range(L):
        a = _get(sd, fmt.format(i), shape)
        out.append(a.T if transpose else a)
    return np.stack(out)


def _unstack(arr: np.ndarray, fmt: str, out: dict, transpose=False) -> None:
    for i in range(arr.shape[0]):
        a = arr[i].T if transpose else arr[i]
        out[fmt.format(i)] = np.ascontiguousarray(a)


def _dtype_name(arr: np.ndarray) -> str:
    name = str(arr.dtype)
    if name not in _DTYPE_NAMES:
        raise ConfigError(
            f"checkpoint weights are {name}; lm_jax params support float32, bfloat16, float16."
        )
    return name


def _activation(hf_act: str) -> str:
    acts = {
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu": "gelu",
        "silu": "silu",
        "swish": "silu",
        "relu": "relu",
    }
    if hf_act not in acts:
        raise ConfigError(f"unsupported activation {hf_act!r}; supported: {sorted(acts)}.")
    return acts[hf_act]


_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}


def _unbox(params):
    try:
        import flax.linen as nn  # noqa: PLC0415

        return nn.unbox(params)
    except ImportError:  # pragma: no cover - flax is a dependency
        return params


def _to_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _check_no_lora(params: Params) -> None:
    def walk(t, path):
        for k, v in t.items():
            if k.startswith("lora_"):
                raise ConfigError(
                    f"params hold LoRA adapters ({path}/{k}): merge them first "
                    "(lm_jax.adapters.merge) or export them separately with lm_jax.convert.peft."
                )
            if isinstance(v, Mapping):
                walk(v, f"{path}/{k}")

    walk(params, "")


# --------------------------------------------------------------------------- GPT-2


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
        cfg.position == "learned"
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


# --------------------------------------------------------------------------- Llama / Mistral


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    rp = d.get("rope_parameters") or {}
    theta = rp.get("rope_theta", d.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    rs = d.get("rope_scaling") or rp
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConfigError(
            f"unsupported rope scaling type {kind!r}: lm_jax supports none ('default') and "
            "'llama3' (lm_jax.configs.RopeScaling)."
        )
    return theta, RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_len=int(rs["original_max_position_embeddings"]),
    )


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
        cfg.position == "rope"
        and cfg.norm == "rmsnorm"
        and cfg.gated_mlp
        and cfg.sliding_window is None
        and cfg.moe is None
    )


def _mistral_accepts(cfg: ModelConfig) -> bool:
    return _llama_accepts(cfg.replace(sliding_window=None)) and cfg.rope_scaling is None


def _llama_config_to_hf(cfg: ModelConfig) -> dict:
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_len,
        }
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


# Order matters for `to_hf` without model_type: the first architecture that accepts wins.
register_architecture(
    Architecture(
        "mistral",
        "MistralForCausalLM",
        _llama_config,
        _mistral_params,
        _mistral_config_to_hf,
        _llama_params_to_hf,
        lambda c: c.sliding_window is not None and not c.use_bias and _mistral_accepts(c),
    )
)
register_architecture(
    Architecture(
        "llama",
        "LlamaForCausalLM",
        _llama_config,
        _llama_params,
        _llama_config_to_hf,
        _llama_params_to_hf,
        _llama_accepts,
    )
)
register_architecture(
    Architecture(
        "gpt2",
        "GPT2LMHeadModel",
        _gpt2_config,
        _gpt2_params,
        _gpt2_config_to_hf,
        _gpt2_params_to_hf,
        _gpt2_accepts,
    )
)


# --------------------------------------------------------------------------- Mixtral


def _mixtral_config(d: dict) -> ModelConfig:
    if d.get("rope_parameters") is None and d.get("rope_theta") is None:
        d = {**d, "rope_theta": 1e6}  # MixtralConfig's default theta (Llama's is 1e4)
    F = d["intermediate_size"]
    cfg = _llama_config({**d, "attention_bias": False, "mlp_bias": False})
    jitter = float(d.get("router_jitter_noise") or 0.0)
    if not 0.0 <= jitter < 1.0:
        raise ConfigError(f"Mixtral router_jitter_noise={jitter} is not supported: needs [0, 1).")
    return cfg.replace(
        sliding_window=d.get("sliding_window"),
        moe=MoEConfig(
            num_experts=d["num_local_experts"],
            top_k=d["num_experts_per_tok"],
            router="softmax_topk",
            renormalize=True,
            dispatch="dropless",
            expert_mlp_dim=F,
            jitter_noise=jitter,
            load_balance_coef=float(d.get("router_aux_loss_coef", 0.001)),
            router_z_coef=0.0,  # Mixtral has no router z-loss
        ),
    )


def _mixtral_expert_layout(sd: StateDict) -> tuple[str, str]:
    """('fused', 'mlp') for transformers-5 state dicts (`mlp.experts.gate_up_proj [E,2F,D]`,
    `down_proj [E,D,F]`); ('per_expert', sub) for checkpoints on disk (`<sub>.experts.{j}.w1/w3
    [F,D]`, `w2 [D,F]`; sub is `block_sparse_moe`, or `mlp` once renamed)."""
    for sub in ("block_sparse_moe", "mlp"):
        if f"model.layers.0.{sub}.experts.0.w1.weight" in sd:
            return "per_expert", sub
    return "fused", "mlp"


def _mixtral_params(cfg: ModelConfig, sd: StateDict) -> Params:
    m = cfg.moe
    V, D, L = cfg.vocab_size, cfg.d_model, cfg.num_layers
    E, F = m.num_experts, m.expert_mlp_dim or cfg.mlp_dim_
    NH, KH = cfg.num_heads * cfg.head_dim_, cfg.kv_heads * cfg.head_dim_
    h = "model.layers.{}."

    def linear(name, n_in, n_out):
        return {"kernel": _stack(sd, h + name + ".weight", L, (n_out, n_in), transpose=True)}

    layout, sub = _mixtral_expert_layout(sd)
    if layout == "fused":
        gate_up = _stack(sd, h + "mlp.experts.gate_up_proj", L, (E, 2 * F, D))  # [L, E, 2F, D]
        gate_up = gate_up.transpose(0, 1, 3, 2)  # [L, E, D, 2F]
        gate, up = gate_up[..., :F], gate_up[..., F:]  # [L, E, D, F] each
        down = _stack(sd, h + "mlp.experts.down_proj", L, (E, D, F)).transpose(0, 1, 3, 2)
    else:
        e = h + sub + ".experts.{}."

        def experts(w, shape):  # per-expert torch Linear weights -> [L, E, in, out]
            return np.stack(
                [_stack(sd, e.format(i, "{}") + w, E, shape, transpose=True) for i in range(L)]
            )

        gate, up = experts("w1.weight", (F, D)), experts("w3.weight", (F, D))  # [L, E, D, F]
        down = experts("w2.weight", (D, F))  # [L, E, F, D]
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
                "router": linear(sub + ".gate", D, E),  # [L, D, E]
                "experts": {
                    "gate_proj": {"kernel": np.ascontiguousarray(gate)},  # [L, E, D, F]
                    "up_proj": {"kernel": np.ascontiguousarray(up)},  # [L, E, D, F]
                    "down_proj": {"kernel": np.ascontiguousarray(down)},  # [L, E, F, D]
                },
            },
        },
        "norm": {"scale": _get(sd, "model.norm.weight", (D,))},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": _get(sd, "lm_head.weight", (V, D)).T}
    return params


def _mixtral_accepts(cfg: ModelConfig) -> bool:
    m = cfg.moe
    return (
        m is not None
        and m.router == "softmax_topk"
        and m.renormalize
        and m.dispatch == "dropless"  # transformers runs every token through its experts
        and m.num_shared_experts == 0
        and m.every == 1
        and cfg.position == "rope"
        and cfg.norm == "rmsnorm"
        and cfg.gated_mlp
        and not cfg.use_bias
        and cfg.rope_scaling is None
    )


def _mixtral_config_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    d = _llama_config_to_hf(cfg)
    del d["attention_bias"], d["mlp_bias"]  # MixtralConfig has no biases
    d.update(
        intermediate_size=m.expert_mlp_dim or cfg.mlp_dim_,
        sliding_window=cfg.sliding_window,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.load_balance_coef,
        router_jitter_noise=m.jitter_noise,
        output_router_logits=False,
    )
    return d


def _mixtral_params_to_hf(cfg: ModelConfig, p: Params) -> dict[str, np.ndarray]:
    """The per-expert layout (`block_sparse_moe.experts.{j}.w1/w2/w3`) that transformers 5
    `save_pretrained` writes and transformers 4.x reads."""
    sd: dict[str, np.ndarray] = {}
    lay, h = p["layers"], "model.layers.{}."
    sd["model.embed_tokens.weight"] = p["embed_tokens"]["embedding"]
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _unstack(lay["attn"][n]["kernel"], h + "self_attn." + n + ".weight", sd, transpose=True)
    moe, e = lay["mlp"], h + "block_sparse_moe.experts.{}."
    _unstack(moe["router"]["kernel"], h + "block_sparse_moe.gate.weight", sd, transpose=True)
    for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        kernel = moe["experts"][ours]["kernel"]  # [L, E, in, out]
        for i in range(kernel.shape[0]):
            _unstack(kernel[i], e.format(i, "{}") + theirs + ".weight", sd, transpose=True)
    _unstack(lay["attn_norm"]["scale"], h + "input_layernorm.weight", sd)
    _unstack(lay["mlp_norm"]["scale"], h + "post_attention_layernorm.weight", sd)
    sd["model.norm.weight"] = p["norm"]["scale"]
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = p["lm_head"]["kernel"].T
    return sd


register_architecture(
    Architecture(
        "mixtral",
        "MixtralForCausalLM",
        _mixtral_config,
        _mixtral_params,
        _mixtral_config_to_hf,
        _mixtral_params_to_hf,
        _mixtral_accepts,
    )
)


# --------------------------------------------------------------------------- reading


def _torch_state_dict(model) -> dict[str, np.ndarray]:
    import torch  # noqa: PLC0415 - only for model objects

    out = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes  # noqa: PLC0415

            out[k] = t.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def read_safetensors_dir(directory: str) -> dict[str, np.ndarray]:
    """All tensors of the `*.safetensors` files in `directory` (sharded or not), as numpy."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    index = os.path.join(directory, WEIGHTS_FILE + ".index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(directory, p) for p in files]
    else:
        paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not paths:
        raise FileNotFoundError(
            f"no *.safetensors weights in {directory!r}: save the model with "
            "`model.save_pretrained(dir, safe_serialization=True)` (PyTorch .bin files are "
            "not read)."
        )
    sd: dict[str, np.ndarray] = {}
    for p in paths:
        sd.update(load_file(p))
    return sd


def from_hf(model_or_dir) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) from a transformers causal LM object or a local HF folder.

    Params are numpy arrays in the checkpoint's dtype (config.param_dtype follows it).
    """
    if isinstance(model_or_dir, str | os.PathLike):
        directory = os.fspath(model_or_dir)
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path!r} not found: from_hf takes a transformers model object or a local "
                "folder with config.json and *.safetensors."
            )
        with open(path) as f:
            hf_config = json.load(f)
        arch = _architecture(hf_config.get("model_type"))
        sd = read_safetensors_dir(directory)
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        hf_config = model_or_dir.config.to_dict()
        arch = _architecture(hf_config.get("model_type"))
        sd = _torch_state_dict(model_or_dir)
    else:
        raise TypeError(
            f"from_hf takes a transformers PreTrainedModel or a folder path, got "
            f"{type(model_or_dir).__name__}."
        )
    cfg = arch.config_from_hf(hf_config)
    params = arch.params_from_hf(cfg, sd)
    return cfg.replace(param_dtype=_dtype_name(params["embed_tokens"]["embedding"])), params


# --------------------------------------------------------------------------- writing


def hf_model_type(cfg: ModelConfig) -> str:
    """The first registered architecture that can represent `cfg` (raises if none)."""
    for name, arch in ARCHITECTURES.items():
        if arch.accepts(cfg):
            return name
    raise ConfigError(
        "no transformers architecture matches this ModelConfig (position="
        f"{cfg.position}, norm={cfg.norm}, gated_mlp={cfg.gated_mlp}, use_bias={cfg.use_bias}, "
        f"sliding_window={cfg.sliding_window}, moe={cfg.moe is not None}); supported: "
        f"{sorted(ARCHITECTURES)}."
    )


def to_hf(
    config: ModelConfig,
    params: Params,
    out_dir: str,
    model_type: str | None = None,
    extra_config: dict | None = None,
) -> str:
    """Write `config.json` + `model.safetensors` loadable by `AutoModelForCausalLM`.

    `model_type` defaults to `hf_model_type(config)`; `extra_config` (e.g. bos/eos token ids)
    is merged into config.json. Returns `out_dir`.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    model_type = model_type or hf_model_type(config)
    arch = _architecture(model_type)
    if not arch.accepts(config):
        raise ConfigError(f"this ModelConfig cannot be written as model_type {model_type!r}.")
    params = _to_numpy(_unbox(params))
    _check_no_lora(params)
    # Round trip through from_hf checks every shape against the config before anything is written.
    sd = arch.params_to_hf(config, params)
    arch.params_from_hf(config, sd)
    hf_config = {
        "architectures": [arch.hf_class],
        "model_type": model_type,
        **arch.config_to_hf(config),
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
        **(extra_config or {}),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in sd.items()},
        os.path.join(out_dir, WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    return out_dir
