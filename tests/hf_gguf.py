"""transformers' own GGUF loader (the reference), with the file parsed once
(`benchmarks.common.gguf_parsed_once`)."""

import os

from benchmarks.common import gguf_parsed_once

__all__ = ["gguf_parsed_once", "load_hf_gguf"]


def load_hf_gguf(path: str):
    """(HF causal LM in float32, eval mode; HF tokenizer) from a GGUF file."""
    import torch
    import transformers

    folder, name = os.path.dirname(path), os.path.basename(path)
    with gguf_parsed_once():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        ).eval()
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok
