"""Several named adapter sets over one frozen base."""

from __future__ import annotations

from lm_jax.adapters.io import load_adapters
from lm_jax.adapters.tree import check_has_base, combine, split_lora
from lm_jax.configs.lora import LoraConfig
from lm_jax.errors import ConfigError


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
        return combine(self.base, self.adapters[name])

    def config(self, name: str):
        """The ModelConfig to run adapter `name` with (needs base_cfg)."""
        if self.base_cfg is None:
            raise ConfigError("AdapterBank(base, base_cfg) needs base_cfg for config().")
        return self.base_cfg.replace(lora=self.configs[name])
