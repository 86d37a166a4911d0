"""LoRA adapter trees over a frozen base: the nested dicts of `*lora_a` / `*lora_b` leaves.

`split_lora`, `combine`, `merge` / `unmerge`, `cast_base`, `trainable_mask` (`tree`);
`check_targets` (`targets`); `lora_optimizer` (`optim`); `save_adapters` / `load_adapters`
(`io`, Orbax, adapter bytes only); `AdapterBank` (`bank`, several named adapters over one base).
The config is `lm_jax.configs.lora.LoraConfig`; the in-module hooks are in `lm_jax.nn.lora`;
peft adapter folders convert in `lm_jax.convert.peft`.
"""

from lm_jax.adapters.bank import AdapterBank
from lm_jax.adapters.io import (
    ADAPTER_FORMAT,
    ADAPTER_META,
    is_adapter_dir,
    load_adapters,
    restore_full_model_guard,
    save_adapters,
)
from lm_jax.adapters.optim import lora_optimizer
from lm_jax.adapters.targets import check_targets
from lm_jax.adapters.tree import (
    cast_base,
    check_has_base,
    combine,
    is_lora_path,
    merge,
    split_lora,
    trainable_mask,
    tree_bytes,
    unmerge,
)
from lm_jax.configs.lora import DEFAULT_TARGETS, LoraConfig
from lm_jax.errors import AdapterCheckpointError

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_META",
    "DEFAULT_TARGETS",
    "AdapterBank",
    "AdapterCheckpointError",
    "LoraConfig",
    "cast_base",
    "check_has_base",
    "check_targets",
    "combine",
    "is_adapter_dir",
    "is_lora_path",
    "load_adapters",
    "lora_optimizer",
    "merge",
    "restore_full_model_guard",
    "save_adapters",
    "split_lora",
    "trainable_mask",
    "tree_bytes",
    "unmerge",
]
