"""Mixtral <-> lm_jax: Mistral attention + a dropless softmax-top-k MoE (`lm_jax.nn.moe`).

Expert weights in memory (transformers 5, fused `gate_up_proj`) and on disk (per expert
`w1` / `w3` / `w2`) are both read; `to_hf` writes the on-disk layout."""

from __future__ import annotations

import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig, MoEConfig
from lm_jax.convert.hf_common import (
    Architecture,
    Params,
    StateDict,
    _get,
    _stack,
    _unstack,
    family_switches,
)
from lm_jax.convert.hf_llama import (
    _llama_config,
    _llama_config_to_hf,
)


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
        and not family_switches(cfg)
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
        sliding_window=cfg.sliding_window if any(cfg.local_layers) else None,
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


MIXTRAL = Architecture(
    "mixtral",
    "MixtralForCausalLM",
    _mixtral_config,
    _mixtral_params,
    _mixtral_config_to_hf,
    _mixtral_params_to_hf,
    _mixtral_accepts,
)
