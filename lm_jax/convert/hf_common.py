"""Shared pieces of the Hugging Face converters: the `Architecture` registry and tensor helpers.

The converters are `lm_jax.convert.hf_gpt2`, `hf_llama` (Llama, Mistral), `hf_mixtral`,
`hf_qwen` (Qwen2, Qwen3) and `hf_gemma` (Gemma 2, Gemma 3 text; shared layout: `hf_decoder`);
`lm_jax.convert.hf` registers them and holds `from_hf` / `to_hf`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig

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


ENCODER_MODEL_TYPES = {"bert": "lm_jax.convert.hf_bert"}  # encoders: their own converters


def _architecture(model_type: str | None) -> Architecture:
    if model_type in ENCODER_MODEL_TYPES and model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model_type {model_type!r} is an encoder, not a causal LM: load it with "
            f"{ENCODER_MODEL_TYPES[model_type]}.from_hf (an EncoderConfig and encoder params)."
        )
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
    return nn.unbox(params)


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


# --------------------------------------------------------------------------- family switches

_SWITCHES = (
    "qkv_bias",
    "qk_norm",
    "norm_unit_offset",
    "embed_scale",
    "post_norms",
    "attn_softcap",
    "final_softcap",
    "query_pre_attn_scalar",
    "rope_local_theta",
)


def family_switches(cfg: ModelConfig) -> frozenset[str]:
    """The Qwen / Gemma `ModelConfig` switches set away from their defaults, plus "mixed_layers"
    when local and global layers alternate: an `accepts` compares this to what its family has."""
    on = {n for n in _SWITCHES if getattr(cfg, n) not in (None, False)}
    if cfg.mixed_layers:
        on.add("mixed_layers")
    return frozenset(on)


def _layer_kinds_from_hf(
    types: list[str] | None, window: int | None, L: int
) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) from HF `layer_types` ("sliding_attention" /
    "full_attention") and its window; all-alike layers give layer_types None (all local: the
    window everywhere; all global: no window)."""
    types = list(types) if types is not None else ["sliding_attention"] * L
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad or len(types) != L:
        raise ConfigError(
            f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {L} "
            f"layers, got {types!r}."
        )
    local = [t == "sliding_attention" for t in types]
    if window is None or not any(local):
        return None, None
    if all(local):
        return int(window), None
    return int(window), tuple("local" if x else "global" for x in local)


def _layer_kinds_to_hf(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if x else "full_attention" for x in cfg.local_layers]
