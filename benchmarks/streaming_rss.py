"""Peak RSS of pretraining from a large streamed corpus (default: a 2 GB generated text file).

    python benchmarks/streaming_rss.py                  # 2 GB, 300 steps of --preset=tiny
    python benchmarks/streaming_rss.py --gb=0.5 --steps=100

Writes the corpus in 1 MB chunks (blank-line separated paragraphs, chunks drawn in a seeded
order from 64 distinct ones), trains `experiments/pretrain.py --preset=tiny` on it through
`--data.source=stream:<file>` with the byte tokenizer in a child process, and prints the child's
peak RSS (`ru_maxrss` from wait4) next to the corpus size. The corpus and the run's workdir are
deleted afterwards. Acceptance: peak RSS under 1.5 GB for a 2 GB corpus.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(path: str, nbytes: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = np.array(
        "the king queen and of to a in that is was he for it with as his on be at by "
        "lord crown river winter summer night light stone".split()
    )
    chunks = []
    for _ in range(64):  # ~1 MB each: paragraphs of 1-8 lines of 4-13 words
        w = words[rng.integers(len(words), size=(20_000, 10))]
        lines = [" ".join(r[: rng.integers(4, 11)]) for r in w]
        cuts = np.cumsum(rng.integers(1, 9, size=len(lines)))
        cuts = cuts[cuts < len(lines)]
        paras = ["\n".join(p).capitalize() + "." for p in np.split(np.array(lines), cuts)]
        chunks.append(("\n\n".join(paras) + "\n\n").encode())
    with open(path, "wb") as f:
        while f.tell() < nbytes:
            f.write(chunks[int(rng.integers(len(chunks)))])
        return f.tell()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="corpus size in GB (1e9 bytes)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dir", default=None, help="folder for the corpus (default: a temp dir)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="streaming_rss_", dir=args.dir)
    try:
        corpus = os.path.join(tmp, "corpus.txt")
        t = time.perf_counter()
        size = write_corpus(corpus, int(args.gb * 1e9))
        print(f"corpus: {size / 1e9:.2f} GB written in {time.perf_counter() - t:.1f} s")
        cmd = [
            sys.executable,
            os.path.join(REPO, "experiments", "pretrain.py"),
            "--preset=tiny",
            f"--data.source=stream:{corpus}",
            "--data.tokenizer=byte",
            f"--train.steps={args.steps}",
            f"--train.save_every={max(1, args.steps // 2)}",
            f"--train.workdir={os.path.join(tmp, 'run')}",
        ]
        print("command:", " ".join(cmd))
        env = os.environ | {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        code = os.waitstatus_to_exitcode(status)
        print("\n".join(out.strip().splitlines()[-12:]))
        peak = usage.ru_maxrss * 1024  # Linux: KiB
        print(
            f"peak RSS of the training process: {peak / 2**30:.3f} GiB ({peak / 1e9:.3f} GB) "
            f"for a {size / 1e9:.2f} GB corpus; {args.steps} steps in {wall:.0f} s; exit {code}"
        )
        return code
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
