"""LoRA adapters as explicit parameters next to the kernels they adapt.

When `ModelConfig.lora` is set, every `Dense` whose module path (e.g. `layers/attn/q_proj`,
`lm_head`) matches one of `LoraConfig.targets` creates two extra parameters beside `kernel`:

    lora_a [d_in, r]   logical names (kernel's in name, "lora_rank")   kaiming-uniform init
    lora_b [r, d_out]  logical names ("lora_rank", kernel's out name)  zeros

and computes y = (x @ kernel + bias) + (dropout(x) @ lora_a @ lora_b) * scale, with
scale = alpha / r (or alpha / sqrt(r) for rsLoRA). The base output is computed first and the
(zero at init) LoRA path added afterwards, so an initialised LoRA model reproduces the base
model to the bit. Under `nn.scan` the factors get the leading L axis like every other layer
parameter. Stacked expert kernels [E, D, F] (MoE) get [E, D, r] / [E, r, F] factors named
`<kernel>_lora_a` / `<kernel>_lora_b` with the "expert" logical axis (see `lora_factors`).

Adapter trees are plain nested dicts holding only the `*lora_a` / `*lora_b` leaves:
`split_lora`, `combine`, `merge` / `unmerge`, `lora_optimizer` (optimizer state for adapter
leaves only), `save_adapters` / `load_adapters` (Orbax, adapter bytes only), `AdapterBank`
(several named adapters over one base).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core.scope import LazyRng

from lm_jax.configs.base import ConfigError

# Attention and (dense or expert) MLP projections of every layer.
DEFAULT_TARGETS = (r"attn/[qkvo]_proj$", r"mlp/(.+/)?(gate|up|down)_proj$")
ADAPTER_META = "lora_adapter.json"
ADAPTER_FORMAT = "lm_jax.lora_adapters"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the projections whose path matches any regex in `targets`."""

    rank: int = 8  # r
    alpha: float = 16.0  # scale = alpha / r (alpha / sqrt(r) with rslora)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # re.search over paths like 'layers/attn/q_proj'
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    dropout: float = 0.0  # dropout on the LoRA input (training only)

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int | np.integer) or self.rank <= 0:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise ConfigError("lora.targets is empty: give at least one path regex.")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"lora.targets pattern {t!r} is not a valid regex: {e}") from e

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def matches(self, path: str) -> bool:
        return any(re.search(t, path) for t in self.targets)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping) -> LoraConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LoraConfig fields {sorted(unknown)}.")
        if "targets" in d and not isinstance(d["targets"], str):
            d["targets"] = tuple(d["targets"])
        return cls(**d)


def _lora_cfg(cfg) -> LoraConfig:
    """A LoraConfig from a LoraConfig or a ModelConfig with `.lora` set."""
    if isinstance(cfg, LoraConfig):
        return cfg
    lora = getattr(cfg, "lora", None)
    if lora is None:
        raise ConfigError("the model config has no LoRA settings: set ModelConfig.lora.")
    return lora


# --------------------------------------------------------------------------- module side


def _deterministic(module: nn.Module) -> bool:
    """The nearest enclosing module's `deterministic` flag (the Block's); True if none."""
    m = module
    while isinstance(m, nn.Module):
        det = getattr(m, "deterministic", None)
        if isinstance(det, bool):
            return det
        m = m.parent
    return True


def kaiming_uniform(key, shape, dtype=jnp.float32):
    """peft/torch `kaiming_uniform_(a=sqrt(5))` on [r, d_in]: U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(shape[-2])  # shape [..., d_in, r]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _extra_param(module: nn.Module, name: str, init, shape, dtype, names) -> jax.Array:
    """A parameter that leaves the module's other parameters' initial values untouched.

    `Module.param` draws from the scope's 'params' RNG counter, and under `nn.scan` (whose
    init runs the body more than once) extra draws shift the kernel's key: the base of a LoRA
    model would then differ from the plain model's init. This key is instead derived from the
    scope's 'params' stream and the parameter name, with no counter involved.
    """

    def make():
        key = LazyRng.create(module.scope.rngs["params"], name).as_jax_rng()
        return nn.with_logical_partitioning(init, names)(key, shape, dtype)

    return module.variable("params", name, make).value


def lora_factors(
    module: nn.Module,
    kernel_shape: tuple[int, ...],  # [..., d_in, d_out]; leading axes e.g. E for experts
    names: tuple[str | None, ...],  # the kernel's logical names
    lora: LoraConfig,
    param_dtype,
    prefix: str = "",
) -> tuple[jax.Array, jax.Array]:
    """Create (a [..., d_in, r], b [..., r, d_out]) in `module` (call from a compact method).

    `prefix` names the factors `<prefix>_lora_a` / `<prefix>_lora_b` when one module holds
    several kernels (MoE experts); Dense uses the plain `lora_a` / `lora_b`.
    """
    *lead, d_in, d_out = kernel_shape
    r = lora.rank
    path = "/".join(module.scope.path) + (f"/{prefix}" if prefix else "")
    if r > min(d_in, d_out):
        raise ConfigError(
            f"lora.rank ({r}) exceeds min(d_in, d_out) = {min(d_in, d_out)} of {path!r} "
            f"(kernel {list(kernel_shape)}): lower lora.rank or narrow lora.targets."
        )
    *lead_names, in_name, out_name = names
    pre = f"{prefix}_" if prefix else ""
    a = _extra_param(
        module,
        f"{pre}lora_a",
        kaiming_uniform,
        (*lead, d_in, r),
        param_dtype,
        (*lead_names, in_name, "lora_rank"),
    )
    b = _extra_param(
        module,
        f"{pre}lora_b",
        nn.initializers.zeros_init(),
        (*lead, r, d_out),
        param_dtype,
        (*lead_names, "lora_rank", out_name),
    )
    return a, b


def lora_delta(
    module: nn.Module, x: jax.Array, a: jax.Array, b: jax.Array, lora: LoraConfig
) -> jax.Array:
    """(dropout(x) @ a @ b) * scale; x [..., M, d_in] with a/b [..., d_in, r] / [..., r, d_out]."""
    if lora.dropout > 0.0 and not _deterministic(module):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), jnp.zeros_like(x))
    h = jnp.matmul(x, a.astype(x.dtype))  # [..., M, r]
    return jnp.matmul(h, b.astype(x.dtype)) * jnp.asarray(lora.scale, x.dtype)


def maybe_lora(
    module: nn.Module,
    x: jax.Array,  # [..., M, d_in] (compute dtype)
    y: jax.Array,  # [..., M, d_out] the base output x @ kernel (+ bias)
    kernel_shape: tuple[int, ...],
    names: tuple[str | None, ...],
    cfg,
    prefix: str = "",
) -> jax.Array:
    """y + LoRA(x) if `cfg.lora` targets this module's path (+ `/prefix`), else y unchanged.

    The hook for `Dense` and for stacked expert kernels: call it right after the base matmul.
    """
    lora = getattr(cfg, "lora", None)
    if lora is None:
        return y
    path = "/".join(module.scope.path) + (f"/{prefix}" if prefix else "")
    if not lora.matches(path):
        return y
    a, b = lora_factors(module, kernel_shape, names, lora, cfg.weight_dtype, prefix)
    return y + lora_delta(module, x, a, b, lora).astype(y.dtype)


# --------------------------------------------------------------------------- tree utilities


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
            "adapters with lm_jax.nn.lora.combine(base, adapters)."
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
    scale = _lora_cfg(cfg).scale
    _, adapters = split_lora(params)
    return _walk_merge(params, adapters, scale, 1.0)


def unmerge(merged, adapters, cfg) -> dict:
    """Inverse of `merge`: kernel -= scale * a @ b and the adapters put back."""
    scale = _lora_cfg(cfg).scale
    return combine(_walk_merge(merged, adapters, scale, -1.0), adapters)


# --------------------------------------------------------------------------- checks


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
    lora = _lora_cfg(cfg)
    if params is None:
        from lm_jax.nn.transformer import Transformer  # noqa: PLC0415 - cycle

        cfg_base = cfg.replace(lora=None)
        tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        params = jax.eval_shape(
            lambda t: Transformer(cfg_base).init(jax.random.key(0), t)["params"], tokens
        )
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


# --------------------------------------------------------------------------- optimizer


def lora_optimizer(tx: optax.GradientTransformation, params=None) -> optax.GradientTransformation:
    """`tx` on the LoRA factors only; frozen leaves get zero updates and no optimizer state.

    (optax.multi_transform masks the frozen leaves out of `tx`'s state: they appear as empty
    `MaskedNode`s, so Adam keeps moments for the adapters only.) `params` is accepted for
    symmetry; the labels are computed from whatever tree `init` receives.
    """
    del params

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "lora" if is_lora_path(p) else "frozen", tree
        )

    return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- save / load


class AdapterCheckpointError(ConfigError):
    """An adapter checkpoint is missing, malformed, or used as a full-model checkpoint."""


def save_adapters(directory: str, adapters, lora_cfg: LoraConfig, extra: dict | None = None):
    """Write adapters (LoRA leaves only) with Orbax + `lora_adapter.json`; returns their bytes."""
    import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, only needed here

    _, adapters = split_lora(_unbox(adapters))
    if not adapters:
        raise ConfigError("no LoRA leaves to save: pass the adapter tree (split_lora(params)[1]).")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "adapters"), adapters, force=True)
        ckpt.wait_until_finished()
    meta = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "lora": _lora_cfg(lora_cfg).to_dict(),
        "bytes": int(nbytes),
        "shapes": {
            "/".join(_key(k) for k in p): [list(x.shape), str(x.dtype)]
            for p, x in jax.tree_util.tree_leaves_with_path(adapters)
        },
        **(extra or {}),
    }
    with open(os.path.join(directory, ADAPTER_META), "w") as f:
        json.dump(meta, f, indent=1)
    return nbytes


def is_adapter_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTER_META))


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_META)
    if not os.path.isfile(path):
        raise AdapterCheckpointError(
            f"{directory!r} is not an lm_jax adapter checkpoint (no {ADAPTER_META}); adapters are "
            "written by lm_jax.nn.lora.save_adapters (peft folders: lm_jax.convert.peft)."
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterCheckpointError(f"{path} has format {meta.get('format')!r}, not an adapter.")
    return meta


def load_adapters(directory: str, target=None) -> tuple[dict, LoraConfig]:
    """(adapters, lora_cfg) from `save_adapters` output.

    `target` (optional, concrete or abstract tree) restores onto its shardings; a target that
    holds base weights (a full model) is an error: adapter checkpoints hold no base weights.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    directory = os.path.abspath(directory)
    meta = _read_meta(directory)
    lora_cfg = LoraConfig.from_dict(meta["lora"])
    if target is not None:
        base, adapters_t = split_lora(_unbox(target))
        if jax.tree.leaves(base):
            raise AdapterCheckpointError(
                f"{directory!r} is an adapter-only checkpoint ({len(meta['shapes'])} LoRA "
                f"tensors, {meta['bytes']} bytes) and holds no base weights, so a full model "
                "cannot be restored from it: load the base model first, then "
                "`combine(base, load_adapters(dir)[0])` (or AdapterBank)."
            )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            adapters_t,
        )
    with ocp.StandardCheckpointer() as ckpt:
        adapters = ckpt.restore(os.path.join(directory, "adapters"), target)
    return adapters, lora_cfg


def restore_full_model_guard(directory: str) -> None:
    """Raise a clear error if `directory` is an adapter-only checkpoint (for model loaders)."""
    if is_adapter_dir(directory):
        meta = _read_meta(directory)
        raise AdapterCheckpointError(
            f"{directory!r} is an adapter-only checkpoint ({meta['bytes']} bytes of LoRA factors) "
            "and holds no base weights: load the base model, then apply these adapters with "
            "lm_jax.nn.lora.load_adapters + combine."
        )


# --------------------------------------------------------------------------- several adapters


def with_adapter(base, adapters) -> dict:
    """Base params + one adapter set (shares the base arrays; nothing is copied)."""
    return combine(base, adapters)


class AdapterBank:
    """One frozen base and several named adapter sets; `params(name)` switches without reloading.

    All adapters must share the model structure (targets may differ only if the model config
    used to apply them does: pass `config(name)` to `Transformer`).
    """

    def __init__(self, base, base_cfg=None):
        check_has_base(base)
        base, extra = split_lora(base)
        if extra:
            raise ConfigError("AdapterBank base holds LoRA leaves: pass split_lora(params)[0].")
        self.base = base
        self.base_cfg = base_cfg
        self.adapters: dict[str, dict] = {}
        self.configs: dict[str, LoraConfig] = {}

    def add(self, name: str, adapters, lora_cfg: LoraConfig) -> None:
        _, adapters = split_lora(adapters)
        combine(self.base, adapters)  # validates the paths now, not at first use
        self.adapters[name] = adapters
        self.configs[name] = lora_cfg

    def load(self, name: str, directory: str) -> None:
        adapters, lora_cfg = load_adapters(directory)
        self.add(name, adapters, lora_cfg)

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def params(self, name: str) -> dict:
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {self.names()}")
        return with_adapter(self.base, self.adapters[name])

    def config(self, name: str):
        """The ModelConfig to run adapter `name` with (needs base_cfg)."""
        if self.base_cfg is None:
            raise ConfigError("AdapterBank(base, base_cfg) needs base_cfg for config().")
        return self.base_cfg.replace(lora=self.configs[name])


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size")))
