"""Adapter trees: plain nested dicts holding only the `*lora_a` / `*lora_b` leaves.

`split_lora` / `combine` (base + adapters), `merge` / `unmerge` (fold into the kernels and back),
`cast_base`, `trainable_mask`, `tree_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax.configs.lora import lora_config
from lm_jax.errors import ConfigError


def _is_lora_name(name: str) -> bool:
    return name in ("lora_a", "lora_b") or name.endswith(("_lora_a", "_lora_b"))


def _kernel_name(lora_name: str) -> str:
    """'lora_a' -> 'kernel'; 'up_lora_a' -> 'up'."""
    base = lora_name[: -len("lora_a")].rstrip("_")
    return base or "kernel"


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _unbox(params):
    return nn.unbox(params) if params is not None else params


def is_lora_path(path) -> bool:
    return _is_lora_name(_key(path[-1]))


def trainable_mask(params):
    """Tree of bools: True on LoRA factors, False on every base parameter."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_lora_path(p), params)


def _filter(tree, keep_lora: bool):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            sub = _filter(v, keep_lora)
            if sub:
                out[k] = sub
        elif _is_lora_name(k) == keep_lora:
            out[k] = v
    return out


def split_lora(params) -> tuple[dict, dict]:
    """(base, adapters): the same nested dict split into base leaves and LoRA leaves."""
    return _filter(params, False), _filter(params, True)


def combine(base, adapters) -> dict:
    """Deep-merge adapters into base (no copies of leaves); raises if base is adapter-only."""
    check_has_base(base)

    def merge(b, a, path):
        out = dict(b)
        for k, v in a.items():
            if isinstance(v, Mapping):
                if not isinstance(b.get(k), Mapping):
                    raise ConfigError(
                        f"adapter path {'/'.join(path + [k])!r} has no module in the base "
                        "params: the adapters were made for a different model."
                    )
                out[k] = merge(b[k], v, path + [k])
            else:
                out[k] = v
        return out

    return merge(base, adapters, [])


def check_has_base(params) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if leaves and all(is_lora_path(p) for p, _ in leaves):
        raise ConfigError(
            "these params hold only LoRA adapters, no base weights: load the base model "
            "(e.g. lm_jax.convert.from_hf or lm_jax.checkpoint.load_model) and apply the "
            "adapters with lm_jax.adapters.combine(base, adapters)."
        )


def cast_base(params, dtype=jnp.bfloat16):
    """Cast the frozen base's floating leaves to `dtype`; LoRA factors keep their dtype."""

    def one(path, x):
        if is_lora_path(path) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def _delta(a, b, scale, dtype):
    d = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale  # [..., d_in, d_out]
    return d.astype(dtype)


def _walk_merge(tree, adapters, scale, sign):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out[k] = _walk_merge(v, adapters.get(k, {}) if adapters else {}, scale, sign)
        elif not _is_lora_name(k):
            out[k] = v
    for k, v in (adapters or {}).items():
        if isinstance(v, Mapping) or not k.endswith("lora_a"):
            continue
        kname = _kernel_name(k)
        b = adapters[k[: -len("a")] + "b"]
        w = out[kname]
        out[kname] = (w.astype(jnp.float32) + sign * _delta(v, b, scale, jnp.float32)).astype(
            w.dtype
        )
    return out


def merge(params, cfg) -> dict:
    """Fold the adapters into the kernels (kernel += scale * a @ b); LoRA leaves removed.

    The result runs with `cfg.replace(lora=None)` at plain-model cost.
    """
    scale = lora_config(cfg).scale
    _, adapters = split_lora(params)
    return _walk_merge(params, adapters, scale, 1.0)


def unmerge(merged, adapters, cfg) -> dict:
    """Inverse of `merge`: kernel -= scale * a @ b and the adapters put back."""
    scale = lora_config(cfg).scale
    return combine(_walk_merge(merged, adapters, scale, -1.0), adapters)


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size")))
