r"""Sample a continuation of a prompt from an lm_jax checkpoint, a HF folder or a GGUF file.

python experiments/generate.py --chat --prompt="What is the capital of France?"  # SmolLM2
python experiments/generate.py --checkpoint=/tmp/run --prompt="ROMEO:" --temperature=0.8
python experiments/generate.py --hf_dir=/models/gpt2 --prompt="Hello" --top_p=0.9
"""

from __future__ import annotations

import time

from absl import app, flags

from lm_jax import cli

flags.DEFINE_string("checkpoint", None, "lm_jax training workdir (newest checkpoint).")
flags.DEFINE_string(
    "hf_dir", None, "Local transformers folder (config.json, safetensors, tokenizer)."
)
flags.DEFINE_string("gguf", None, "GGUF file (default when no source is given: SmolLM2-135M).")
flags.DEFINE_string("prompt", "Once upon a time", "Prompt text.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = all.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_bool("chat", False, "Wrap the prompt in the tokenizer's chat template.")
FLAGS = flags.FLAGS


def load():
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.convert.sources import load_any

    srcs = {n: FLAGS[n].value or "" for n in ("checkpoint", "hf_dir", "gguf")}
    if not any(srcs.values()):
        srcs["gguf"] = smollm2_gguf_path()
    return load_any(**srcs)[:3]


def check_flags():
    """Bad sampling flags fail before any model is loaded."""
    from lm_jax.errors import ConfigError
    from lm_jax.generate import _check_sampling

    try:
        _check_sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
    if FLAGS.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")


def main(argv):
    import jax
    import numpy as np

    from lm_jax.generate import generate

    check_flags()
    cfg, params, tok = load()
    text = FLAGS.prompt
    if FLAGS.chat:
        if not hasattr(tok, "apply_chat_template"):
            raise app.UsageError(f"--chat needs a tokenizer with a chat template, got {tok.kind}")
        text = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(text)
    stop = () if tok.eos_id is None else (tok.eos_id,)
    t = time.perf_counter()
    out = generate(
        cfg,
        params,
        [ids],
        jax.random.key(FLAGS.seed),
        FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        stop_tokens=stop,
        pad_id=tok.pad_id,
    )
    n = int(out.lengths[0])
    secs = time.perf_counter() - t
    new = [int(x) for x in np.asarray(out.tokens[0, :n]) if int(x) not in stop]
    print(text + tok.decode(new))
    logp = float(np.asarray(out.logprobs[0, :n]).sum())
    print(f"\n[{n} tokens in {secs:.2f}s incl. compile; log p = {logp:.2f}]")


if __name__ == "__main__":
    cli.run(main)
