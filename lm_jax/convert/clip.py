"""HF `CLIPModel` / `SiglipModel` -> lm_jax `TwoTowers` (config and params).

    cfg = two_tower_config_from_hf(hf_model.config)
    params = two_tower_params_from_hf(hf_model.state_dict(), cfg)
    out = TwoTowers(cfg).apply({"params": params}, images_nhwc, input_ids, mask)

HF pixel_values are NCHW: transpose to NHWC (`x.transpose(0, 2, 3, 1)`). torch Linear weights
[out, in] become kernels [in, out]; per-layer tensors are stacked on a leading L axis; the
conv patch weight [D, C, p, p] becomes an HWIO kernel [p, p, C, D].
CLIP's legacy `eos_token_id == 2` (pool at argmax(input_ids)) is mapped to `eos_id = V - 1`,
the position of the largest id when the end-of-text token is the last of the vocabulary.
"""

from __future__ import annotations

import jax
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.two_towers import TextConfig, TwoTowerConfig
from lm_jax.nn.vision import VisionConfig

_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


class ConversionError(ValueError):
    """The HF model or state dict does not fit the lm_jax two-tower architecture."""


def _block_cfg(c, vocab: int = 1, max_len: int = 1) -> ModelConfig:
    act = _ACT.get(c.hidden_act)
    if act is None:
        raise ConversionError(f"unsupported activation {c.hidden_act!r}; known: {sorted(_ACT)}.")
    return ModelConfig(
        vocab_size=vocab,
        d_model=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        max_len=max_len,
        norm="layernorm",
        norm_eps=c.layer_norm_eps,
        activation=act,
        gated_mlp=False,
        use_bias=True,
        position="learned",
        tie_embeddings=True,
    )


def two_tower_config_from_hf(hf_config) -> TwoTowerConfig:
    """CLIPConfig or SiglipConfig -> TwoTowerConfig."""
    kind = hf_config.model_type
    if kind not in ("clip", "siglip"):
        raise ConversionError(f"expected a clip or siglip config, got model_type {kind!r}.")
    tc, vc = hf_config.text_config, hf_config.vision_config
    siglip = kind == "siglip"
    vision = VisionConfig(
        encoder=_block_cfg(vc),
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        channels=vc.num_channels,
        position="learned",
        pooling="map" if siglip else "cls",
        pre_norm=not siglip,
        patch_bias=siglip,
    )
    if siglip:
        text = TextConfig(
            _block_cfg(tc, tc.vocab_size, tc.max_position_embeddings), causal=False, pooling="last"
        )
        embed_dim = getattr(tc, "projection_size", None) or tc.hidden_size
    else:
        eos = tc.eos_token_id if tc.eos_token_id != 2 else tc.vocab_size - 1
        text = TextConfig(
            _block_cfg(tc, tc.vocab_size, tc.max_position_embeddings), True, "eos", eos
        )
        embed_dim = hf_config.projection_dim
    return TwoTowerConfig(
        vision=vision,
        text=text,
        embed_dim=embed_dim,
        image_proj=not siglip,
        text_proj_bias=siglip,
        loss="siglip" if siglip else "clip",
        max_logit_scale=100.0 if not siglip else float("inf"),
    )


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, np.float32)


def _linear(sd, prefix: str, bias: bool = True) -> dict:
    out = {"kernel": _np(sd[prefix + ".weight"]).T}
    if bias:
        out["bias"] = _np(sd[prefix + ".bias"])
    return out


def _ln(sd, prefix: str) -> dict:
    return {"scale": _np(sd[prefix + ".weight"]), "bias": _np(sd[prefix + ".bias"])}


def _encoder_layers(sd, prefix: str, n: int) -> dict:
    def one(i):
        p = f"{prefix}.{i}."
        return {
            "attn": {
                "q_proj": _linear(sd, p + "self_attn.q_proj"),
                "k_proj": _linear(sd, p + "self_attn.k_proj"),
                "v_proj": _linear(sd, p + "self_attn.v_proj"),
                "o_proj": _linear(sd, p + "self_attn.out_proj"),
            },
            "attn_norm": _ln(sd, p + "layer_norm1"),
            "mlp_norm": _ln(sd, p + "layer_norm2"),
            "mlp": {"up_proj": _linear(sd, p + "mlp.fc1"), "down_proj": _linear(sd, p + "mlp.fc2")},
        }

    layers = [one(i) for i in range(n)]
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def two_tower_params_from_hf(state_dict, cfg: TwoTowerConfig) -> dict:
    """A CLIPModel / SiglipModel state dict (torch tensors or arrays) -> TwoTowers params."""
    sd = dict(state_dict)
    if "logit_scale" not in sd:
        raise ConversionError(
            "state dict has no logit_scale: pass a full CLIPModel/SiglipModel state_dict()."
        )
    siglip = cfg.loss == "siglip"
    vc, tc = cfg.vision, cfg.text.model
    v, t = "vision_model.", "text_model."
    w = _np(sd[v + "embeddings.patch_embedding.weight"])  # [D, C, p, p]
    vision = {
        "patch_embed_kernel": w.transpose(2, 3, 1, 0),  # [p, p, C, D]
        "pos_embed": _np(sd[v + "embeddings.position_embedding.weight"]),
        "layers": _encoder_layers(sd, v + "encoder.layers", vc.encoder.num_layers),
        "norm": _ln(sd, v + "post_layernorm"),
    }
    if siglip:
        vision["patch_embed_bias"] = _np(sd[v + "embeddings.patch_embedding.bias"])
        h = v + "head."
        D = vc.encoder.d_model
        wq, wk, wv = np.split(_np(sd[h + "attention.in_proj_weight"]), 3, axis=0)
        bq, bk, bv = np.split(_np(sd[h + "attention.in_proj_bias"]), 3, axis=0)
        vision["head"] = {
            "probe": _np(sd[h + "probe"]).reshape(1, D),
            "q": {"kernel": wq.T, "bias": bq},
            "k": {"kernel": wk.T, "bias": bk},
            "v": {"kernel": wv.T, "bias": bv},
            "o": _linear(sd, h + "attention.out_proj"),
            "norm": _ln(sd, h + "layernorm"),
            "mlp": {"up_proj": _linear(sd, h + "mlp.fc1"), "down_proj": _linear(sd, h + "mlp.fc2")},
        }
    else:
        vision["cls"] = _np(sd[v + "embeddings.class_embedding"])
        vision["pre_norm"] = _ln(sd, v + "pre_layrnorm")
    text = {
        "embed_tokens": {"embedding": _np(sd[t + "embeddings.token_embedding.weight"])},
        "embed_positions": _np(sd[t + "embeddings.position_embedding.weight"]),
        "layers": _encoder_layers(sd, t + "encoder.layers", tc.num_layers),
        "norm": _ln(sd, t + "final_layer_norm"),
    }
    params = {
        "vision": vision,
        "text": text,
        "logit_scale": _np(sd["logit_scale"]).reshape(()),
    }
    if siglip:
        params["text_proj"] = _linear(sd, t + "head")
        params["logit_bias"] = _np(sd["logit_bias"]).reshape(())
    else:
        params["image_proj"] = _linear(sd, "visual_projection", bias=False)
        params["text_proj"] = _linear(sd, "text_projection", bias=False)
    return params
