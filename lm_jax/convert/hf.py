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

    Qwen2 / Qwen3 = Llama + q/k/v biases / q,k RMSNorms (`hf_qwen`); Gemma 2 / Gemma 3 text =
            Llama layout + (1 + w) norms, four norms per layer, scaled embeddings, soft caps
            (Gemma 2), q,k norms and two RoPE bases (Gemma 3), mixed sliding / global layers
            (`hf_gemma`; the shared weight layout is `hf_decoder`).

The converters live by family in `hf_gpt2`, `hf_llama` (Llama, Mistral), `hf_mixtral`, `hf_qwen`
and `hf_gemma`, the registry and tensor helpers in `hf_common`. Adding an architecture: write an
`Architecture` (config and weight mapping both ways) and `register_architecture(...)` it;
`from_hf` dispatches on `model_type`, and `to_hf` picks the first registered architecture whose
`accepts(cfg)` is true (or the `model_type` it is given).
"""

import glob
import json
import os

import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.convert.hf_common import (
    ARCHITECTURES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    Architecture,
    Params,
    StateDict,
    _architecture,
    _check_no_lora,
    _dtype_name,
    _to_numpy,
    _unbox,
    family_switches,
    register_architecture,
)
from lm_jax.convert.hf_gemma import GEMMA2, GEMMA3
from lm_jax.convert.hf_gpt2 import GPT2
from lm_jax.convert.hf_llama import LLAMA, MISTRAL
from lm_jax.convert.hf_mixtral import MIXTRAL
from lm_jax.convert.hf_qwen import QWEN2, QWEN3

# Order matters for `to_hf` without model_type: the first architecture that accepts wins.
for _arch in (MISTRAL, LLAMA, GPT2, MIXTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3):
    register_architecture(_arch)


# --------------------------------------------------------------------------- reading


def _torch_state_dict(model) -> dict[str, np.ndarray]:
    import torch  # only for model objects

    out = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            out[k] = t.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def read_safetensors_dir(directory: str) -> dict[str, np.ndarray]:
    """All tensors of the `*.safetensors` files in `directory` (sharded or not), as numpy."""
    from safetensors.numpy import load_file

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
        cfg = arch.config_from_hf(hf_config)  # unsupported options fail before any weight read
        sd = read_safetensors_dir(directory)
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        hf_config = model_or_dir.config.to_dict()
        arch = _architecture(hf_config.get("model_type"))
        cfg = arch.config_from_hf(hf_config)
        sd = _torch_state_dict(model_or_dir)
    else:
        raise TypeError(
            f"from_hf takes a transformers PreTrainedModel or a folder path, got "
            f"{type(model_or_dir).__name__}."
        )
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
        f"sliding_window={cfg.sliding_window}, moe={cfg.moe is not None}, switches="
        f"{sorted(family_switches(cfg))}); supported: "
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
    from safetensors.numpy import save_file

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


__all__ = [
    "ARCHITECTURES",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "Architecture",
    "Params",
    "StateDict",
    "from_hf",
    "hf_model_type",
    "read_safetensors_dir",
    "register_architecture",
    "to_hf",
]
