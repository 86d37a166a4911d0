"""Adapter checkpoints: Orbax files of the LoRA leaves only, plus `lora_adapter.json`."""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from lm_jax.adapters.tree import _key, _unbox, split_lora
from lm_jax.configs.lora import LoraConfig, lora_config
from lm_jax.errors import AdapterCheckpointError, ConfigError

ADAPTER_META = "lora_adapter.json"
ADAPTER_FORMAT = "lm_jax.lora_adapters"


def save_adapters(directory: str, adapters, lora_cfg: LoraConfig, extra: dict | None = None):
    """Write adapters (LoRA leaves only) with Orbax + `lora_adapter.json`; returns their bytes."""
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
        "lora": lora_config(lora_cfg).to_dict(),
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
            "written by lm_jax.adapters.save_adapters (peft folders: lm_jax.convert.peft)."
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
            "lm_jax.adapters.load_adapters + combine."
        )
