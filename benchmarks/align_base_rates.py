r"""Whole-word base rates of an LM's samples: which words appear in 3-10% (or 1-3%) of
continuations, to pick constraints for the alignment reproduction (issue 6).

  python -m benchmarks.align_base_rates --base=/tmp/align_base --samples=1024 --max_new_tokens=80
"""

from __future__ import annotations

import re
import time
from collections import Counter

import jax
from absl import app, flags

flags.DEFINE_string("base", None, "Checkpoint workdir, HF model dir or .gguf file.", required=True)
flags.DEFINE_integer("samples", 1024, "Base samples.")
flags.DEFINE_integer("batch", 128, "Samples per sampler call.")
flags.DEFINE_integer("max_new_tokens", 80, "Continuation length.")
flags.DEFINE_string("prompt", "\n", "Text every sample continues.")
flags.DEFINE_integer("top", 60, "Words to list.")


def main(_):
    from lm_jax.align.loop import decode_samples, diversity, load_base, sample_many
    from lm_jax.align.policies import make_lm_policy
    from lm_jax.align.samplers import SamplerConfig

    F = flags.FLAGS
    cfg, params, tok = load_base(F.base)
    stop = () if tok.eos_id is None else (tok.eos_id,)
    policy, _, frozen = make_lm_policy(
        cfg, params, SamplerConfig(F.max_new_tokens, stop, tuple(tok.encode(F.prompt)))
    )
    t = time.perf_counter()
    s = sample_many(
        lambda k, b: policy.sample_base(frozen, k, b), jax.random.key(0), F.samples, F.batch
    )
    texts = decode_samples(tok, s)
    dt = time.perf_counter() - t
    print(f"{F.samples} samples x {F.max_new_tokens} tokens in {dt:.1f} s")
    docs = Counter()
    for text in texts:
        docs.update(set(re.findall(r"[A-Za-z']+", text)))
    print("diversity:", diversity(texts))
    print("examples:", *[repr(x) for x in texts[:5]], sep="\n  ")
    print("| word | base rate (whole word, case-sensitive) |")
    for w, c in docs.most_common(F.top):
        print(f"| {w} | {c / len(texts):.3f} |")


if __name__ == "__main__":
    app.run(main)
