"""Per-request adapters: several LoRA adapter sets stacked so that every row of one batch runs
its own adapter (or none) through the same dispatch.

    bank = stack_adapters(base_params, [(adapters_1, lora_cfg_1), (adapters_2, lora_cfg_2)])
    rows = select_rows(bank, adapter_index)           # adapter_index [B] int32, 0 = no adapter
    model.apply({"params": base_params, ROWS: rows}, tokens, positions, cache=cache)

`bank` mirrors the params tree of the Dense modules any set targets: `lora_a` [..., n + 1, d_in,
r] and `lora_b` [..., n + 1, r, d_out] (the leading `...` is the scanned layer axis), index 0
all zeros (the base model), index i the i-th set with its scale alpha / r folded into `lora_b`
and its rank zero-padded to the largest one, which changes no product. A set that does not
target a module has zeros there. `select_rows` gathers each row's factors ([..., B, d_in, r]);
`lm_jax.nn.lora.row_lora` adds x_b @ a_b @ b_b to every targeted Dense output. The LoRA maths is
the one of `merge`: a row with adapter i computes what the model with adapter i merged does
(up to float rounding), as `tests/serving/test_engine_adapters.py` checks.

Dense kernels only: adapters on stacked expert kernels (MoE) or on the LM head are refused
(merge those into the weights instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.adapters.tree import split_lora
from lm_jax.configs.lora import LoraConfig
from lm_jax.errors import ConfigError


def _flat_modules(tree, prefix=()) -> dict[tuple[str, ...], dict]:
    """{module path: {leaf name: array}} for the dict leaves of a nested params tree."""
    out: dict[tuple[str, ...], dict] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_modules(v, (*prefix, k)))
        else:
            out.setdefault(prefix, {})[k] = v
    return out


def _nest(flat: dict[tuple[str, ...], dict]) -> dict:
    root: dict = {}
    for path, leaves in flat.items():
        node = root
        for k in path:
            node = node.setdefault(k, {})
        node.update(leaves)
    return root


def stack_adapters(base, adapter_sets: Sequence[tuple[dict, LoraConfig]]) -> dict:
    """The bank of `adapter_sets` over `base` (module docstring); ConfigError for adapters on
    modules `base` lacks, on expert kernels or on the LM head, or of another kernel's shape."""
    if not adapter_sets:
        raise ConfigError("stack_adapters needs at least one adapter set.")
    base_mods = _flat_modules(nn.unbox(split_lora(base)[0]))
    sets = []
    for adapters, lora_cfg in adapter_sets:
        mods = _flat_modules(nn.unbox(split_lora(adapters)[1]))
        for path, leaves in mods.items():
            name = "/".join(path)
            if set(leaves) != {"lora_a", "lora_b"}:
                raise ConfigError(
                    f"per-request adapters cover Dense kernels only; {name!r} holds "
                    f"{sorted(leaves)} (expert kernels): merge those adapters into the model."
                )
            if path[-1] == "lm_head" or "kernel" not in base_mods.get(path, {}):
                raise ConfigError(
                    f"adapter module {name!r} is not a Dense kernel of the base model "
                    "(per-request adapters cannot target the LM head or missing modules): "
                    "give adapters trained on this base, or merge them."
                )
        sets.append((mods, float(lora_cfg.scale)))
    paths = sorted({p for mods, _ in sets for p in mods})
    r_max = max(int(leaves["lora_a"].shape[-1]) for mods, _ in sets for leaves in mods.values())
    flat = {}
    for path in paths:
        kernel = np.asarray(base_mods[path]["kernel"])
        *lead, d_in, d_out = kernel.shape
        a_all = np.zeros((*lead, len(sets) + 1, d_in, r_max), np.float32)
        b_all = np.zeros((*lead, len(sets) + 1, r_max, d_out), np.float32)
        for i, (mods, scale) in enumerate(sets, start=1):
            if path not in mods:
                continue
            a = np.asarray(mods[path]["lora_a"], np.float32)
            b = np.asarray(mods[path]["lora_b"], np.float32)
            r = a.shape[-1]
            if a.shape != (*lead, d_in, r) or b.shape != (*lead, r, d_out):
                raise ConfigError(
                    f"adapter {i} on {'/'.join(path)!r}: factors {a.shape} / {b.shape} do not "
                    f"fit the kernel {kernel.shape}: give adapters trained on this base."
                )
            a_all[..., i, :, :r] = a
            b_all[..., i, :r, :] = b * scale
        flat[path] = {"lora_a": jnp.asarray(a_all), "lora_b": jnp.asarray(b_all)}
    return _nest(flat)


def num_adapters(bank: dict) -> int:
    """Adapter sets in `bank` (index 0, the base, not counted)."""
    leaf = jax.tree.leaves(bank)[0]
    return int(leaf.shape[-3]) - 1


def select_rows(bank: dict, index: jax.Array) -> dict:
    """Each row's factors: index [B] int32 (0 = no adapter) -> leaves [..., B, d_in, r] /
    [..., B, r, d_out], the `lm_jax.nn.lora.ROWS` collection for `model.apply`."""
    return jax.tree.map(lambda t: jnp.take(t, index, axis=t.ndim - 3), bank)


def random_adapters(params, lora: LoraConfig, seed: int = 0, std: float = 0.02) -> dict:
    """A trained-looking adapter tree for `params` (tests, benchmarks): factors on every kernel
    `lora` targets, a ~ N(0, 1 / d_in) and b ~ N(0, std) ([L, ...] under the layer scan), unlike
    the B = 0 init, which is a no-op."""
    rng = np.random.default_rng(seed)

    def walk(tree, path):
        out = {}
        for k, v in tree.items():
            p = f"{path}/{k}" if path else k
            if isinstance(v, dict) and "kernel" in v and lora.matches(p):
                *lead, d_in, d_out = np.shape(v["kernel"])
                a = rng.normal(0.0, d_in**-0.5, (*lead, d_in, lora.rank))
                b = rng.normal(0.0, std, (*lead, lora.rank, d_out))
                out[k] = {"lora_a": a.astype(np.float32), "lora_b": b.astype(np.float32)}
            elif isinstance(v, dict) and (sub := walk(v, p)):
                out[k] = sub
        return out

    return walk(nn.unbox(params), "")
