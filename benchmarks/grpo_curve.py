r"""Plot a post-training run's held-out reward by step (GRPO's eval/reward: exact-match accuracy
with an arithmetic reward) from its workdir's metrics.jsonl.

  .venv/bin/python -m benchmarks.grpo_curve --workdir=/tmp/grpo_arith \
      --out=benchmarks/grpo_arith.png
"""

from __future__ import annotations

import json
import os

from absl import app, flags

flags.DEFINE_string("workdir", None, "Run folder holding metrics.jsonl.", required=True)
flags.DEFINE_string("key", "eval/reward", "Metric to plot.")
flags.DEFINE_string("label", "held-out accuracy (arith_last)", "Y axis label.")
flags.DEFINE_string("out", "benchmarks/grpo_arith.png", "PNG to write.")


def main(argv):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    F = flags.FLAGS
    path = os.path.join(F.workdir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pts = sorted({r["step"]: r[F.key] for r in rows if F.key in r}.items())
    if not pts:
        raise SystemExit(f"error: {path} has no {F.key!r} rows")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(*zip(*pts), marker="o")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(F.label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(F.out, dpi=120)
    print(f"{F.out}: {pts}")


if __name__ == "__main__":
    app.run(main)
