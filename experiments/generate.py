r"""Sample a continuation of a prompt from an lm_jax checkpoint, a HF folder or a GGUF file.

python experiments/generate.py --chat --prompt="What is the capital of France?"  # SmolLM2
python experiments/generate.py --checkpoint=/tmp/run --prompt="ROMEO:" --temperature=0.8
python experiments/generate.py --hf_dir=/models/gpt2 --prompt="Hello" --top_p=0.9
python experiments/generate.py --speculative=ngram --lookahead=4 --temperature=0  # prompt lookup
python experiments/generate.py --speculative=layers --draft_layers=10  # the first 10 blocks draft
"""

from __future__ import annotations

import time

from absl import app, flags

from lm_jax import cli

flags.DEFINE_string("checkpoint", None, "lm_jax training workdir (newest checkpoint).")
flags.DEFINE_string(
    "hf_dir", None, "Local transformers folder (config.json, safetensors, tokenizer)."
)
flags.DEFINE_string("gguf", None, "GGUF file or name: smollm2 (default, no source given), gemma3.")
flags.DEFINE_string("adapters", "", "LoRA adapters to merge into the model: a fine-tuning "
                    "workdir trained with LoRA (or its adapters folder).")
flags.DEFINE_string("prompt", "Once upon a time", "Prompt text.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = all.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_bool("chat", False, "Wrap the prompt in the tokenizer's chat template.")
flags.DEFINE_enum(
    "speculative", "none", ["none", "ngram", "layers"],
    "Speculative decoding (exact: same distribution, same greedy output): ngram = prompt lookup, "
    "layers = the model's first --draft_layers blocks as the draft.",
)  # fmt: skip
flags.DEFINE_integer("lookahead", 4, "Speculative decoding: tokens proposed per target forward.")
flags.DEFINE_integer("draft_layers", 0, "--speculative=layers: blocks in the draft (0 = a third).")
flags.DEFINE_integer("max_ngram", 3, "--speculative=ngram: longest suffix matched.")
flags.DEFINE_integer(
    "num_beams", 1, "> 1: beam search with this many beams (HF's; temperature/top-k/top-p unused)."
)
flags.DEFINE_float("length_penalty", 1.0, "Beam search: score = log p / length ** this.")
flags.DEFINE_integer(
    "prefill_chunk", 512, "Prompt tokens per prefill window (bounds its memory); 0 = all at once."
)
FLAGS = flags.FLAGS


def load():
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.convert.sources import load_any

    srcs = {n: FLAGS[n].value or "" for n in ("checkpoint", "hf_dir", "gguf")}
    if not any(srcs.values()):
        srcs["gguf"] = smollm2_gguf_path()
    return load_any(**srcs, adapters=FLAGS.adapters)[:3]


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
    if FLAGS.num_beams < 1:
        raise ConfigError(f"--num_beams must be >= 1, got {FLAGS.num_beams}")
    if FLAGS.prefill_chunk < 0:
        raise ConfigError(f"--prefill_chunk must be >= 0 (0 = all), got {FLAGS.prefill_chunk}")
    if FLAGS.num_beams > 1 and FLAGS.speculative != "none":
        raise ConfigError("--num_beams > 1 and --speculative: choose one (beam search or sampling)")
    if FLAGS.speculative != "none":
        from lm_jax.speculative import SpeculativeConfig

        method = "ngram" if FLAGS.speculative == "ngram" else "draft"
        try:
            SpeculativeConfig(FLAGS.lookahead, method, FLAGS.max_ngram).check()
        except ValueError as e:
            raise ConfigError(f"--{e}") from None


def decode(cfg, params, ids, stop, pad_id):
    """-> (new token ids, summary line): beam search, generate or speculative_generate."""
    import numpy as np

    if FLAGS.num_beams > 1:
        from lm_jax.beam_search import beam_search

        out = beam_search(
            cfg, params, [ids], FLAGS.max_new_tokens, FLAGS.num_beams, FLAGS.length_penalty,
            stop_tokens=stop, pad_id=pad_id, prefill_chunk=FLAGS.prefill_chunk,
        )  # fmt: skip
        n = int(out.lengths[0])
        line = f"{n} tokens; {FLAGS.num_beams} beams, score {float(out.scores[0]):.3f}"
        return np.asarray(out.tokens[0, :n]), line
    out, stats = sample(cfg, params, ids, stop, pad_id)
    n = int(out.lengths[0])
    logp = float(np.asarray(out.logprobs[0, :n]).sum())
    return np.asarray(out.tokens[0, :n]), f"{n} tokens; log p = {logp:.2f}{stats}"


def sample(cfg, params, ids, stop, pad_id):
    """generate, or speculative_generate under --speculative; -> (GenerateOutput, stats line)."""
    import jax

    from lm_jax.errors import ConfigError
    from lm_jax.generate import generate
    from lm_jax.speculative import SpeculativeConfig, layer_draft, speculative_generate

    kw = dict(
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, stop_tokens=stop,
        pad_id=pad_id, prefill_chunk=FLAGS.prefill_chunk,
    )  # fmt: skip
    key = jax.random.key(FLAGS.seed)
    if FLAGS.speculative == "none":
        return generate(cfg, params, [ids], key, FLAGS.max_new_tokens, **kw), ""
    dcfg = dparams = None
    if FLAGS.speculative == "layers":
        n = FLAGS.draft_layers or max(cfg.num_layers // 3, 1)
        try:
            dcfg, dparams = layer_draft(cfg, params, n)
        except ValueError as e:
            raise ConfigError(f"--draft_layers: {e}") from None
    method = "ngram" if FLAGS.speculative == "ngram" else "draft"
    spec = SpeculativeConfig(FLAGS.lookahead, method, FLAGS.max_ngram)
    out = speculative_generate(
        cfg, params, [ids], key, FLAGS.max_new_tokens, spec, dcfg, dparams, **kw
    )
    line = f"; {out.acceptance:.0%} of drafts accepted, {out.tokens_per_round:.2f} tokens/forward"
    return out.output, line


def main(argv):
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
    tokens, line = decode(cfg, params, ids, stop, tok.pad_id)
    secs = time.perf_counter() - t
    print(text + tok.decode([int(x) for x in tokens if int(x) not in stop]))
    print(f"\n[{line}; {secs:.2f}s incl. compile]")


if __name__ == "__main__":
    cli.run(main)
