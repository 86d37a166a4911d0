"""Start-up check that LoRA targets match kernels of the model (building it abstractly)."""

from __future__ import annotations

import re

import jax

from lm_jax.adapters.tree import _is_lora_name, _kernel_name, _key, _unbox, split_lora
from lm_jax.configs.lora import lora_config
from lm_jax.errors import ConfigError
from lm_jax.nn.transformer import abstract_params


def _target_kernels(params) -> dict[str, tuple[int, ...]]:
    """Adaptable kernels by path: Dense `<path>/kernel` -> '<path>'; a stacked expert kernel
    `<path>/<name>` of rank >= 3 inside an experts module -> '<path>/<name>'. Shapes without the
    scanned L axis are not separated (the last two axes are d_in, d_out)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [_key(k) for k in path]
        name = keys[-1]
        if _is_lora_name(name):
            continue
        if name == "kernel":
            out["/".join(keys[:-1])] = tuple(leaf.shape)
        elif "experts" in keys[:-1] and len(leaf.shape) >= 3:
            out["/".join(keys)] = tuple(leaf.shape)
    return out


def check_targets(cfg, params=None) -> dict[str, tuple[int, ...]]:
    """Start-up check; returns {adapted path: kernel shape}.

    Raises ConfigError if a target pattern matches no kernel (never silently train nothing),
    if lora.rank > min(d_in, d_out) of a matched kernel, or if `params` (when given and holding
    LoRA leaves) lack the factors of a matched kernel. `params` may be abstract (eval_shape);
    by default the model is initialised abstractly from `cfg` (a ModelConfig).
    """
    lora = lora_config(cfg)
    if params is None:
        params = abstract_params(cfg.replace(lora=None))
    params = _unbox(params)
    kernels = _target_kernels(params)
    for t in lora.targets:
        if not any(re.search(t, p) for p in kernels):
            raise ConfigError(
                f"lora.targets pattern {t!r} matches no kernel of the model, so nothing would "
                f"be trained; the adaptable paths are {sorted(kernels)}."
            )
    matched = {p: s for p, s in kernels.items() if lora.matches(p)}
    for p, s in matched.items():
        if lora.rank > min(s[-2], s[-1]):
            raise ConfigError(
                f"lora.rank ({lora.rank}) exceeds min(d_in, d_out) = {min(s[-2:])} of {p!r} "
                f"(kernel {list(s)}): lower lora.rank or narrow lora.targets."
            )
    _, adapters = split_lora(params)
    if adapters:
        have = {
            "/".join(_key(k) for k in path[:-1])
            + ("" if _key(path[-1]) == "lora_a" else "/" + _kernel_name(_key(path[-1])))
            for path, _ in jax.tree_util.tree_leaves_with_path(adapters)
            if _key(path[-1]).endswith("lora_a")
        }
        missing = sorted(set(matched) - have)
        if missing:
            raise ConfigError(f"params lack LoRA factors for targeted kernels {missing}.")
    return matched
