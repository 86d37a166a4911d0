"""peft LoRA adapter folders <-> lm_jax adapter trees (GPT-2 and Llama families).

A peft folder holds `adapter_config.json` and `adapter_model.safetensors` with, per adapted
torch module, `...<module>.lora_A.weight [r, in]` and `...<module>.lora_B.weight [out, r]`;
peft computes `x @ A^T @ B^T * scale` (also for GPT-2's Conv1D: `fan_in_fan_out` only matters
when peft merges). Ours: `lora_a = A^T [in, r]`, `lora_b = B^T [r, out]`, stacked over layers.

Module names:
    GPT-2  transformer.h.{i}.attn.c_attn -> attn/{q,k,v}_proj    (fused [D, 3D]: see below)
           transformer.h.{i}.attn.c_proj -> attn/o_proj
           transformer.h.{i}.mlp.c_fc    -> mlp/up_proj
           transformer.h.{i}.mlp.c_proj  -> mlp/down_proj
    Llama  model.layers.{i}.self_attn.{q,k,v,o}_proj -> attn/{q,k,v,o}_proj
           model.layers.{i}.mlp.{gate,up,down}_proj  -> mlp/{gate,up,down}_proj

Fused c_attn. Import: peft's single A is shared by q, k and v, and B's rows split in thirds
([q; k; v]), so each of our q/k/v factors gets the same A and its slice of B: exact.
Export: if q, k and v carry the identical A (e.g. imported from peft) it is written once with
B = [B_q; B_k; B_v] at rank r. Otherwise a block construction is exact: A = [A_q | A_k | A_v]
(concatenated along the rank, [D, 3r]) and B block-diagonal ([3r, 3D]), so c_attn gets rank
3r through peft's `rank_pattern` and `alpha_pattern` (alpha scaled so that peft's
alpha/r -- or alpha/sqrt(r) with rsLoRA -- equals ours). Absent projections get zero B rows.

Per-module ranks or alphas on import (`rank_pattern`/`alpha_pattern`, e.g. from our block
export) become one rank r = max over modules: A zero-padded, B zero-padded and multiplied by
(module scale / our scale). Layers peft did not adapt (`layers_to_transform`) get zero factors.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from lm_jax.adapters.tree import split_lora
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.lora import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# (regex over the torch module name) -> our module paths under `layers/`
_GPT2 = {
    "attn.c_attn": ("attn/q_proj", "attn/k_proj", "attn/v_proj"),
    "attn.c_proj": ("attn/o_proj",),
    "mlp.c_fc": ("mlp/up_proj",),
    "mlp.c_proj": ("mlp/down_proj",),
}
_LLAMA = {
    **{f"self_attn.{p}_proj": (f"attn/{p}_proj",) for p in "qkvo"},
    **{f"mlp.{p}_proj": (f"mlp/{p}_proj",) for p in ("gate", "up", "down")},
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:transformer\.h|model\.layers)\.(\d+)\.(.+)\.lora_([AB])"
    r"(?:\.[^.]+)?\.weight$"
)


class PeftError(ConfigError):
    """A peft adapter folder that lm_jax cannot represent (the message says why)."""


def infer_arch(cfg: ModelConfig) -> str:
    """'gpt2' for learned-position non-gated models (fused c_attn naming), else 'llama'."""
    return "gpt2" if cfg.position == "learned" and not cfg.gated_mlp else "llama"


def _table(arch: str) -> dict:
    if arch not in ("gpt2", "llama"):
        raise PeftError(f"peft arch must be 'gpt2' or 'llama', got {arch!r}.")
    return _GPT2 if arch == "gpt2" else _LLAMA


def _pattern_value(patterns: dict, name: str, default):
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return default


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="np") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            out[k] = np.asarray(f.get_tensor(k), np.float32)
    return out


def load_peft_adapters(
    directory: str, cfg: ModelConfig, arch: str | None = None
) -> tuple[LoraConfig, dict]:
    """(lora_cfg, adapters) from a peft LoRA folder for the model `cfg` (from `from_hf`).

    Run the model with `cfg.replace(lora=lora_cfg)` and `combine(base_params, adapters)`.
    """
    arch = arch or infer_arch(cfg)
    table = _table(arch)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    w_path = os.path.join(directory, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: not a peft adapter folder (save_pretrained).")
    with open(cfg_path) as f:
        pc = json.load(f)
    if pc.get("peft_type", "LORA") != "LORA":
        raise PeftError(f"{cfg_path}: peft_type {pc.get('peft_type')!r} is not LORA.")
    for flag in ("use_dora", "lora_bias"):
        if pc.get(flag):
            raise PeftError(f"{cfg_path}: {flag}=True is not supported by lm_jax LoRA.")
    if pc.get("bias", "none") != "none":
        raise PeftError(f"{cfg_path}: bias={pc['bias']!r} (trained biases) is not supported.")
    if pc.get("modules_to_save"):
        raise PeftError(f"{cfg_path}: modules_to_save {pc['modules_to_save']} is not supported.")
    rslora = bool(pc.get("use_rslora", False))
    r0, alpha0 = int(pc["r"]), float(pc["lora_alpha"])
    ranks, alphas = pc.get("rank_pattern") or {}, pc.get("alpha_pattern") or {}

    # torch module -> {layer: (A [r, in], B [out, r])}
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, val in _read_safetensors(w_path).items():
        m = _KEY.match(key)
        if m is None:
            raise PeftError(f"{w_path}: tensor {key!r} is not a per-layer LoRA factor lm_jax maps.")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in table:
            raise PeftError(
                f"{w_path}: adapted module {module!r} has no lm_jax counterpart for {arch} "
                f"(supported: {sorted(table)})."
            )
        if layer >= cfg.num_layers:
            raise PeftError(f"{w_path}: layer {layer} >= the model's {cfg.num_layers} layers.")
        found.setdefault(module, {}).setdefault(layer, {})[ab] = val
    if not found:
        raise PeftError(f"{w_path} holds no LoRA factors.")

    def module_scale(module, layer):
        name = f"h.{layer}.{module}" if arch == "gpt2" else f"layers.{layer}.{module}"
        r = int(_pattern_value(ranks, name, r0))
        a = float(_pattern_value(alphas, name, alpha0))
        return r, _scale(a, r, rslora)

    rank = max(module_scale(mod, layer)[0] for mod, layers in found.items() for layer in layers)
    lora_cfg = LoraConfig(
        rank=rank,
        alpha=alpha0 * (rank / r0 if not rslora else math.sqrt(rank / r0)),
        targets=tuple(sorted(f"layers/{p}$" for mod in found for p in table[mod])),
        rslora=rslora,
        dropout=float(pc.get("lora_dropout", 0.0) or 0.0),
    )
    ours = lora_cfg.scale
    adapters: dict = {}
    for module, layers in found.items():
        paths = table[module]
        A = B = None
        for layer, fac in layers.items():
            if set(fac) != {"A", "B"}:
                raise PeftError(f"{w_path}: {module} layer {layer} lacks lora_A or lora_B.")
            a, b = fac["A"].T, fac["B"].T  # [in, r], [r, out]
            r, s = module_scale(module, layer)
            if a.shape[1] != r or b.shape[0] != r:
                raise PeftError(f"{w_path}: {module} layer {layer} has rank {a.shape[1]}, not {r}.")
            if A is None:
                A = np.zeros((cfg.num_layers, a.shape[0], rank), np.float32)
                B = np.zeros((cfg.num_layers, rank, b.shape[1]), np.float32)
            A[layer, :, :r] = a
            B[layer, :r, :] = b * (s / ours)
        outs = np.split(B, len(paths), axis=-1) if len(paths) > 1 else [B]
        for path, b in zip(paths, outs, strict=True):
            group, name = path.split("/")
            adapters.setdefault("layers", {}).setdefault(group, {})[name] = {
                "lora_a": A.astype(cfg.weight_dtype),
                "lora_b": b.astype(cfg.weight_dtype),
            }
    return lora_cfg, adapters


def save_peft_adapters(
    directory: str,
    adapters,
    cfg: ModelConfig,
    arch: str | None = None,
    base_model_name_or_path: str | None = None,
) -> dict:
    """Write lm_jax adapters as a peft folder `PeftModel.from_pretrained(hf_model, dir)` loads.

    `cfg.lora` gives rank, alpha and rsLoRA. Returns the adapter_config dict written.
    """
    from safetensors.numpy import save_file

    lora = cfg.lora
    if lora is None:
        raise ConfigError("save_peft_adapters needs cfg.lora (the config the adapters train with).")
    arch = arch or infer_arch(cfg)
    table = _table(arch)
    _, adapters = split_lora(adapters)
    layers = adapters.get("layers", {})
    known = {p for paths in table.values() for p in paths}
    have = {f"{g}/{n}" for g, mods in layers.items() for n in mods}
    extra = sorted(have - known) + sorted(k for k in adapters if k != "layers")
    if extra:
        raise PeftError(f"adapters on {extra} have no peft/{arch} counterpart: cannot export.")
    prefix = "base_model.model." + ("transformer.h" if arch == "gpt2" else "model.layers")
    r, alpha = lora.rank, lora.alpha
    tensors: dict[str, np.ndarray] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}

    def get(path):
        g, n = path.split("/")
        f = layers.get(g, {}).get(n)
        return None if f is None else (np.asarray(f["lora_a"]), np.asarray(f["lora_b"]))

    for module, paths in table.items():
        facs = [get(p) for p in paths]
        if all(f is None for f in facs):
            continue
        present = [f for f in facs if f is not None]
        L = present[0][0].shape[0]
        d_in = present[0][0].shape[1]
        if len(paths) == 1:
            A, B = present[0]
        elif all(np.array_equal(f[0], present[0][0]) for f in present):
            # one shared A (as imported from peft): B = [B_q | B_k | B_v], zeros if absent
            A = present[0][0]
            B = np.concatenate(
                [
                    f[1] if f is not None else np.zeros((L, r, _out(cfg, p)), np.float32)
                    for f, p in zip(facs, paths, strict=True)
                ],
                axis=-1,
            )
        else:
            # block construction at rank n*r: A = [A_1 | ... | A_n], B block-diagonal
            n = len(present)
            A = np.concatenate([f[0] for f in present], axis=-1)  # [L, D, n*r]
            outs = [_out(cfg, p) for p in paths]
            B = np.zeros((L, n * r, sum(outs)), np.float32)
            j, col = 0, 0
            for f, width in zip(facs, outs, strict=True):
                if f is not None:
                    B[:, j * r : (j + 1) * r, col : col + width] = f[1]
                    j += 1
                col += width
            rank_pattern[module] = n * r
            alpha_pattern[module] = alpha * (math.sqrt(n) if lora.rslora else n)
        assert A.shape[1] == d_in
        targets.append(module)
        for layer in range(L):
            base = f"{prefix}.{layer}.{module}"
            tensors[f"{base}.lora_A.weight"] = np.ascontiguousarray(A[layer].T, np.float32)
            tensors[f"{base}.lora_B.weight"] = np.ascontiguousarray(B[layer].T, np.float32)
    if not tensors:
        raise PeftError("no adapters to export.")
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "use_rslora": lora.rslora,
        "lora_dropout": lora.dropout,
        "fan_in_fan_out": arch == "gpt2",
        "bias": "none",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return config


def _out(cfg: ModelConfig, path: str) -> int:
    """Output width of a fused-slot projection (q: N*H, k/v: K*H)."""
    if path.endswith("q_proj"):
        return cfg.num_heads * cfg.head_dim_
    return cfg.kv_heads * cfg.head_dim_
