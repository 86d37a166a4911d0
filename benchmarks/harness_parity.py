"""lm-eval through lm_jax's backend beside lm-eval through its own `hf` backend, same weights.

  python -m benchmarks.harness_parity --models=smollm2,gemma3 --limit=40

For each model (a packaged GGUF: transformers' GGUF loader reads the same file for `hf`, in
float32) and each BIG-bench multiple-choice task (local lm-eval configs, no hub): acc and
acc_norm from both backends, the share of documents where both choose the same answer, the
largest log-likelihood difference, and each backend's evaluation time (model loading timed
apart). The order of the two backends alternates task by task. Writes a JSON record and prints a
markdown table.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = "anachronisms,navigate,snarks,winowhy,physical_intuition,date_understanding"
flags.DEFINE_list("models", ["smollm2", "gemma3"], "Packaged GGUF names (lm_jax.convert.gguf).")
flags.DEFINE_list("tasks", TASKS.split(","), "BIG-bench folders in ../shared/data/bigbench.")
flags.DEFINE_integer("limit", 40, "Documents per task (0 = all).")
flags.DEFINE_integer("batch_size", 8, "Batch size of both backends.")
flags.DEFINE_string("out", "benchmarks/harness_parity.json", "JSON record.")
FLAGS = flags.FLAGS


def _evaluate(lm, task: str, include: str):
    """(results dict, per-doc log-likelihood lists, seconds) of one task on one backend."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], batch_size=FLAGS.batch_size, log_samples=True,
        task_manager=TaskManager(include_path=include, include_defaults=False),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return out["results"][task], lls, seconds


def _load_backends(name: str):
    import torch
    from lm_eval.models.huggingface import HFLM

    from benchmarks.common import gguf_parsed_once
    from lm_jax.convert.gguf import resolve_gguf
    from lm_jax.eval.harness import LmJaxLM

    path = resolve_gguf(name)
    t0 = time.perf_counter()
    ours = LmJaxLM(gguf=path, batch_size=FLAGS.batch_size)
    t1 = time.perf_counter()
    with gguf_parsed_once():
        theirs = HFLM(
            pretrained=os.path.dirname(path), gguf_file=os.path.basename(path),
            dtype=torch.float32, batch_size=FLAGS.batch_size, device="cpu",
        )  # fmt: skip
    t2 = time.perf_counter()
    return ours, theirs, t1 - t0, t2 - t1


def main(_):
    import numpy as np

    from benchmarks.common import machine
    from lm_jax.eval import bigbench
    from lm_jax.eval.tasks import DEFAULT_DATA_DIR

    root = os.path.join(DEFAULT_DATA_DIR, "bigbench")
    include = tempfile.mkdtemp(prefix="lm_jax_harness_parity_")
    limit = FLAGS.limit or None
    tasks = bigbench.write_lm_eval_tasks(root, FLAGS.tasks, include, limit)
    record = {
        "machine": machine(),
        "limit": limit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": [],
    }
    for name in FLAGS.models:
        ours, theirs, load_ours, load_theirs = _load_backends(name)
        print(f"{name}: load lm_jax {load_ours:.1f} s, hf {load_theirs:.1f} s", flush=True)
        for k, (folder, task) in enumerate(zip(FLAGS.tasks, tasks)):
            order = [("lm_jax", ours), ("hf", theirs)]
            runs = dict(
                (label, _evaluate(lm, task, include))
                for label, lm in (order if k % 2 == 0 else order[::-1])
            )
            (ra, lla, sa), (rb, llb, sb) = runs["lm_jax"], runs["hf"]
            same = float(
                np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(lla, llb)])
            )
            diff = float(
                max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(lla, llb))
            )
            row = {
                "model": name, "task": folder, "docs": len(lla),
                "acc_lm_jax": ra["acc,none"], "acc_hf": rb["acc,none"],
                "acc_norm_lm_jax": ra["acc_norm,none"], "acc_norm_hf": rb["acc_norm,none"],
                "same_choice": same, "max_ll_diff": diff,
                "seconds_lm_jax": sa, "seconds_hf": sb, "speedup": sb / sa,
                "load_lm_jax": load_ours, "load_hf": load_theirs,
            }  # fmt: skip
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
        del ours, theirs
    with open(FLAGS.out, "w") as f:
        json.dump(record, f, indent=1)
    head = ["model", "task", "docs", "acc lm_jax / hf", "acc_norm lm_jax / hf", "same choice"]
    head += ["max ll diff", "s lm_jax / hf (x)"]
    print("\n| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in record["rows"]:
        print(
            f"| {r['model']} | {r['task']} | {r['docs']} | "
            f"{r['acc_lm_jax']:.3f} / {r['acc_hf']:.3f} | "
            f"{r['acc_norm_lm_jax']:.3f} / {r['acc_norm_hf']:.3f} | {r['same_choice']:.1%} | "
            f"{r['max_ll_diff']:.1e} | {r['seconds_lm_jax']:.1f} / {r['seconds_hf']:.1f} "
            f"({r['speedup']:.2f}x) |"
        )


if __name__ == "__main__":
    app.run(main)
