"""LoRA inside the modules: the apply-time hooks that create and use adapter factors.

When `ModelConfig.lora` (an `lm_jax.configs.lora.LoraConfig`) is set, every `Dense` whose module
path (e.g. `layers/attn/q_proj`, `lm_head`) matches one of `LoraConfig.targets` creates two extra
parameters beside `kernel`:

    lora_a [d_in, r]   logical names (kernel's in name, "lora_rank")   kaiming-uniform init
    lora_b [r, d_out]  logical names ("lora_rank", kernel's out name)  zeros

and computes y = (x @ kernel + bias) + (dropout(x) @ lora_a @ lora_b) * scale, with
scale = alpha / r (or alpha / sqrt(r) for rsLoRA). The base output is computed first and the
(zero at init) LoRA path added afterwards, so an initialised LoRA model reproduces the base
model to the bit. Under `nn.scan` the factors get the leading L axis like every other layer
parameter. Stacked expert kernels [E, D, F] (MoE) get [E, D, r] / [E, r, F] factors named
`<kernel>_lora_a` / `<kernel>_lora_b` with the "expert" logical axis (see `lora_factors`).

Adapter trees (split / combine / merge, optimizer masks, save / load, banks) live in
`lm_jax.adapters`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.scope import LazyRng

from lm_jax.configs.lora import LoraConfig
from lm_jax.errors import ConfigError


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


# The variable collection of per-row adapter factors (one adapter per batch row: several
# requests, each with its own adapter, in one decode batch; `lm_jax.adapters.rows` builds it).
ROWS = "lora_rows"


def row_lora(module: nn.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """y + each row's own LoRA path when the `lora_rows` collection holds this module's factors
    a [B, d_in, r] and b [B, r, d_out] (scale folded into b; zeros = no adapter for that row);
    x [B, ..., d_in], y [B, ..., d_out]. Unchanged y otherwise."""
    if not module.has_variable(ROWS, "lora_a"):
        return y
    a, b = module.get_variable(ROWS, "lora_a"), module.get_variable(ROWS, "lora_b")
    B = x.shape[0]
    xs = x.reshape(B, -1, x.shape[-1])
    h = jnp.einsum("bmd,bdr->bmr", xs, a.astype(xs.dtype))
    d = jnp.einsum("bmr,bro->bmo", h, b.astype(xs.dtype))
    return y + d.reshape(y.shape).astype(y.dtype)


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
