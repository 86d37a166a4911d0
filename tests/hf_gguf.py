"""transformers' own GGUF loader (the reference), with the file parsed once.

`from_pretrained(..., gguf_file=...)` opens the file three times (config, weights, tokenizer)
with gguf's GGUFReader, which takes ~6 s for SmolLM2's 49k vocabulary and ~25 s for Gemma 3's
262k; transformers only reads the parse, so one serves all three."""

import contextlib
import functools
import os
from unittest import mock


@contextlib.contextmanager
def gguf_parsed_once():
    """Inside: `gguf.GGUFReader(path)` parses each path once and hands back that reader."""
    import gguf

    with mock.patch.object(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader)):
        yield


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
