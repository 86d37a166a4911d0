"""T5-family encoder-decoders <-> Hugging Face `T5ForConditionalGeneration` (v1.0: ReLU, tied
head with scaled decoder outputs; v1.1: gated GELU, untied head, no scaling).

`from_hf(model_or_dir)` -> (T5Config, numpy params); `to_hf(cfg, params, out_dir)` writes
`config.json` + `model.safetensors` that transformers loads back. Params are `lm_jax.nn.t5`'s.
transformers 5 ties every T5 head to the embedding and reads `tie_word_embeddings: false` as
"no output scaling" (v1.1); a checkpoint with an lm_head of its own (original v1.1 files) is
read untied here, and written with its lm_head.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.configs.t5 import T5Config, t5_style
from lm_jax.convert.hf import _torch_state_dict, read_safetensors_dir
from lm_jax.convert.hf_common import _check_no_lora, _get, _stack, _to_numpy, _unbox, _unstack

CONFIG_FILE = "config.json"
_ENC, _DEC = "encoder.block.{}.layer.", "decoder.block.{}.layer."
_REL = "0.SelfAttention.relative_attention_bias.weight"
_ATTN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}


def config_from_hf(d: dict) -> T5Config:
    """T5Config from a HF T5 config dict (unsupported options fail here, before any weight)."""
    if d.get("model_type", "t5") != "t5":
        raise ConfigError(
            f"model_type {d.get('model_type')!r} is not T5; lm_jax reads model_type 't5'"
        )
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
               if k not in d]  # fmt: skip
    if missing:
        raise ConfigError(f"the T5 config.json lacks {', '.join(missing)}: not a T5 config")
    ff = d.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise ConfigError(f"feed_forward_proj {ff!r} is not supported; use 'relu' or 'gated-gelu'")
    # transformers 5 always ties T5's head; `tie_word_embeddings: false` (v1.1) then only turns
    # the output scaling off. A checkpoint with its own lm_head unties it (`from_hf`).
    scale = d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True) is not False)
    model = t5_style(
        ff, vocab_size=d["vocab_size"], d_model=d["d_model"], num_layers=d["num_layers"],
        num_heads=d["num_heads"], head_dim=d["d_kv"], mlp_dim=d["d_ff"],
        max_len=int(d.get("n_positions", 512) or 512), norm_eps=d.get("layer_norm_epsilon", 1e-6),
        dropout=float(d.get("dropout_rate", 0.1)), tie_embeddings=True,
    )  # fmt: skip
    return T5Config(
        model=model, num_decoder_layers=d.get("num_decoder_layers") or d["num_layers"],
        relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
        scale_decoder_outputs=bool(scale), pad_token_id=_id(d, "pad_token_id", 0),
        eos_token_id=_id(d, "eos_token_id", 1),
        decoder_start_token_id=_id(d, "decoder_start_token_id", 0),
    )  # fmt: skip


def _id(d: dict, key: str, default: int) -> int:
    """A special-token id of a HF config; missing or null -> T5's default."""
    v = d.get(key)
    return default if v is None else int(v)


def config_to_hf(cfg: T5Config) -> dict:
    m = cfg.model
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": m.vocab_size, "d_model": m.d_model, "d_kv": m.head_dim_, "d_ff": m.mlp_dim_,
        "num_layers": m.num_layers, "num_decoder_layers": cfg.decoder_layers,
        "num_heads": m.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": m.dropout, "layer_norm_epsilon": m.norm_eps,
        "feed_forward_proj": "gated-gelu" if m.gated_mlp else "relu",
        "tie_word_embeddings": bool(cfg.scale_decoder_outputs),
        "is_encoder_decoder": True, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id, "decoder_start_token_id": cfg.decoder_start_token_id,
        "n_positions": m.max_len,
    }  # fmt: skip


def _ff_names(cfg: T5Config) -> dict[str, str]:
    return (
        {"wi_0": "wi_0", "wi_1": "wi_1", "wo": "wo"}
        if cfg.model.gated_mlp
        else {"wi": "wi", "wo": "wo"}
    )


def _stack_map(cfg: T5Config, decoder: bool) -> dict[tuple[str, ...], tuple[str, tuple, bool]]:
    """(our path under layers/) -> (HF name format, torch shape, is a Linear weight)."""
    m = cfg.model
    D, NH, F = m.d_model, m.num_heads * m.head_dim_, m.mlp_dim_
    pre = _DEC if decoder else _ENC
    out: dict = {}
    for ours, hf in _ATTN.items():
        shape = (D, NH) if ours == "o_proj" else (NH, D)
        out[("attn", ours, "kernel")] = (pre + "0.SelfAttention." + hf + ".weight", shape, True)
        if decoder:
            out[("cross", ours, "kernel")] = (
                pre + "1.EncDecAttention." + hf + ".weight",
                shape,
                True,
            )
    ff = pre + ("2" if decoder else "1") + ".DenseReluDense."
    for ours, hf in _ff_names(cfg).items():
        out[("mlp", ours, "kernel")] = (
            ff + hf + ".weight",
            (D, F) if ours == "wo" else (F, D),
            True,
        )
    out[("attn_norm", "scale")] = (pre + "0.layer_norm.weight", (D,), False)
    if decoder:
        out[("cross_norm", "scale")] = (pre + "1.layer_norm.weight", (D,), False)
    out[("mlp_norm", "scale")] = (
        pre + ("2" if decoder else "1") + ".layer_norm.weight",
        (D,),
        False,
    )
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _at(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def params_from_hf(cfg: T5Config, sd) -> dict:
    """lm_jax T5 params (numpy) from a `T5ForConditionalGeneration` state dict."""
    m = cfg.model
    V, D, N = m.vocab_size, m.d_model, m.num_heads
    nb = cfg.relative_attention_num_buckets
    params: dict = {
        "shared": {"embedding": _get(sd, "shared.weight", (V, D))},
        "encoder_rel_bias": _get(sd, _ENC.format(0) + _REL, (nb, N)),
        "decoder_rel_bias": _get(sd, _DEC.format(0) + _REL, (nb, N)),
        "encoder_norm": {"scale": _get(sd, "encoder.final_layer_norm.weight", (D,))},
        "decoder_norm": {"scale": _get(sd, "decoder.final_layer_norm.weight", (D,))},
        "encoder": {"layers": {}},
        "decoder": {"layers": {}},
    }  # fmt: skip
    for decoder, stack, L in (
        (False, "encoder", m.num_layers),
        (True, "decoder", cfg.decoder_layers),
    ):
        for path, (fmt, shape, linear) in _stack_map(cfg, decoder).items():
            _set(params[stack]["layers"], path, _stack(sd, fmt, L, shape, transpose=linear))
    if not m.tie_embeddings:
        params["lm_head"] = {"kernel": _get(sd, "lm_head.weight", (V, D)).T}
    return params


def params_to_hf(cfg: T5Config, p: dict) -> dict[str, np.ndarray]:
    """The `T5ForConditionalGeneration` state dict (the inverse of `params_from_hf`)."""
    sd: dict = {
        "shared.weight": p["shared"]["embedding"],
        "encoder.embed_tokens.weight": p["shared"]["embedding"],
        "decoder.embed_tokens.weight": p["shared"]["embedding"],
        _ENC.format(0) + _REL: p["encoder_rel_bias"],
        _DEC.format(0) + _REL: p["decoder_rel_bias"],
        "encoder.final_layer_norm.weight": p["encoder_norm"]["scale"],
        "decoder.final_layer_norm.weight": p["decoder_norm"]["scale"],
        "lm_head.weight": (p["shared"]["embedding"] if cfg.model.tie_embeddings
                           else p["lm_head"]["kernel"].T),
    }  # fmt: skip
    for decoder, stack in ((False, "encoder"), (True, "decoder")):
        for path, (fmt, _, linear) in _stack_map(cfg, decoder).items():
            _unstack(np.asarray(_at(p[stack]["layers"], path)), fmt, sd, transpose=linear)
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def from_hf(model_or_dir) -> tuple[T5Config, dict]:
    """(T5Config, numpy params) from a transformers T5ForConditionalGeneration or a folder."""
    if isinstance(model_or_dir, str | os.PathLike):
        path = os.path.join(model_or_dir, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} not found: a T5 folder needs config.json")
        with open(path) as f:
            d = json.load(f)
        cfg = config_from_hf(d)
        sd = read_safetensors_dir(os.fspath(model_or_dir))
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        d = model_or_dir.config.to_dict()
        cfg = config_from_hf(d)
        sd = _torch_state_dict(model_or_dir)
    else:
        raise TypeError(f"from_hf takes a T5 model or a folder, got {type(model_or_dir).__name__}")
    if "lm_head.weight" in sd and not np.array_equal(
        np.asarray(sd["lm_head.weight"]), np.asarray(sd["shared.weight"])
    ):
        cfg = cfg.replace(model=cfg.model.replace(tie_embeddings=False))
    return cfg, params_from_hf(cfg, sd)


def to_hf(cfg: T5Config, params, out_dir: str) -> str:
    """Write config.json + model.safetensors for T5ForConditionalGeneration; returns out_dir."""
    from safetensors.numpy import save_file

    params = _to_numpy(_unbox(params))
    _check_no_lora(params)
    sd = params_to_hf(cfg, params)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    shared = {k for k in sd if k.endswith("embed_tokens.weight")}
    if cfg.model.tie_embeddings:
        shared.add("lm_head.weight")
    save_file(
        {k: v for k, v in sd.items() if k not in shared}, os.path.join(out_dir, "model.safetensors")
    )
    return out_dir
