"""The side-by-side benchmark suite in one command (issue 11, item 5).

  .venv/bin/python -m benchmarks.run_all --rounds=3            # CPU: train, decode, eval, moe
  .venv/bin/python -m benchmarks.run_all --rounds=3 --sst2     # + LoRA vs full fine-tuning
  .venv/bin/python -m benchmarks.run_all --gpu --rounds=3      # + MFU of GPT-2 124M and ~1B Llama
  .venv/bin/python -m benchmarks.run_all --gpu --smoke --rounds=1 --only=mfu   # CPU check

One round = every job once, each in its own process: the lm_jax and HF transformers (PyTorch)
workers of train_throughput, decode and eval_throughput (the benchmarks' own `--worker` modes,
so both frameworks do exactly what those scripts time), moe_step (dense vs MoE, lm_jax only),
optionally sst2_lora_vs_full (`--sst2`, minutes per round) and the MFU jobs (`--gpu`). Odd
rounds run the job list reversed (benchmark and framework order both flip). A matmul noise probe
(`benchmarks.common.matmul_peak_flops`, 1024^3 f32 through XLA) runs before and after each round;
a round whose probes differ by more than `--probe_tolerance` is flagged noisy and left out of
the medians (all rounds are used, and the table says so, when every round is noisy).
Writes a markdown block (medians, per-round-ratio medians, % of the measured matmul peak) to
stdout and to `--out`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

from benchmarks.common import machine, matmul_peak_flops, median, random_lm_batch

flags.DEFINE_integer("rounds", 3, "Suite rounds (job order reversed on odd rounds).")
flags.DEFINE_list("only", [], "Run only these benchmarks: train, decode, eval, moe, sst2, mfu.")
flags.DEFINE_bool("sst2", False, "Include sst2_lora_vs_full (several minutes per round on CPU).")
flags.DEFINE_bool("gpu", False, "Add the MFU jobs (GPT-2 124M seq 1024, ~1B Llama style).")
flags.DEFINE_bool("smoke", False, "MFU jobs at a tiny size (checks they launch, e.g. on CPU).")
flags.DEFINE_bool("quick", False, "Smaller sizes for every job (a fast check of the suite).")
flags.DEFINE_float("probe_tolerance", 0.25, "Max relative probe change within a clean round.")
flags.DEFINE_string("out", "benchmarks/results_suite.md", "Markdown output file ('' = none).")
flags.DEFINE_string("json_out", "", "Raw per-round results as JSON.")
flags.DEFINE_string("mfu_worker", None, "Internal: run one MFU job (gpt2_124m / llama_1b).")
flags.DEFINE_integer("mfu_steps", 10, "Timed train steps per MFU job.")
flags.DEFINE_string("remat", "dots", "ModelConfig.remat for the ~1B MFU job.")
FLAGS = flags.FLAGS

DECODE_DIR = "/tmp/lm_jax_decode_bench"
EVAL_DIR = "/tmp/lm_jax_eval_bench"


# --------------------------------------------------------------------------- job definitions


def sizes() -> dict:
    q = FLAGS.quick
    return {
        "train": ["--batch=8", "--seq=256", f"--steps={2 if q else 4}"],
        "decode": [
            "--reps=1", f"--new_tokens={16 if q else 64}", "--prompt_len=32",
            "--batches=1", "--fwd_batch=4", f"--fwd_seq={64 if q else 256}",
            "--random=false", f"--dir={DECODE_DIR}",
        ],
        "eval": ["--batch=4", "--window=256", f"--batches={1 if q else 4}", f"--dir={EVAL_DIR}"],
        "moe": ["--rounds=1", f"--steps={1 if q else 3}"],
        "sst2": [
            f"--steps={4 if q else 20}", f"--test_limit={16 if q else 100}", "--zero_shot=false",
        ],
    }  # fmt: skip


def jobs() -> list[tuple[str, str]]:
    """(benchmark, worker) in round-0 order."""
    out = []
    for b in ("train", "decode", "eval"):
        out += [(b, "lm_jax"), (b, "hf_torch")]
    out.append(("moe", "lm_jax"))
    if FLAGS.sst2:
        out.append(("sst2", "lm_jax"))
    if FLAGS.gpu:
        out += [("mfu", "gpt2_124m"), ("mfu", "llama_1b")]
    if FLAGS.only:
        out = [j for j in out if j[0] in FLAGS.only]
    return out


def _py(args: list[str], timeout: float | None = None) -> str:
    res = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def prepare(bench: set[str]) -> None:
    """Write what the workers read: the SmolLM2 HF folder (decode), token windows (eval)."""
    if "decode" in bench and not os.path.isdir(os.path.join(DECODE_DIR, "smollm2")):
        code = (
            "import sys; from absl import flags; import benchmarks.decode as d; "
            f"flags.FLAGS(['x', *sys.argv[1:]]); print(d.write_model('{DECODE_DIR}/smollm2'))"
        )
        print("decode model:", _py(["-c", code, *sizes()["decode"]]).strip(), flush=True)
    if "eval" in bench:
        code = (
            "import sys; from absl import flags; import benchmarks.eval_throughput as e; "
            "flags.FLAGS(['x', *sys.argv[1:]]); print(e.write_windows())"
        )
        print("eval windows:", _py(["-c", code, *sizes()["eval"]]).strip(), flush=True)


def parse_moe_step(out: str) -> dict:
    """`benchmarks.moe_step` stdout -> {"moe <variant> ms/step": ms}; variant names carry `:`, `@`
    and `/` (e.g. dropless:block_padded@128/nofast)."""
    steps = re.findall(r"^([\w:@/]+)\s+step\s+([\d.]+) ms", out, re.M)
    if not steps:
        raise RuntimeError(f"moe_step output not understood:\n{out[-2000:]}")
    return {f"moe {v} ms/step": float(ms) for v, ms in steps}


def run_job(bench: str, worker: str) -> dict:
    """One job in its own process -> {metric: value} (tokens/s, or ms/step for moe/sst2)."""
    s = sizes()
    if bench == "train":
        out = _py(["-m", "benchmarks.train_throughput", f"--worker={worker}", *s["train"]])
        return {"train tokens/s": float(out.strip().splitlines()[-1])}
    if bench == "decode":
        out = _py(["-m", "benchmarks.decode", f"--worker={worker}", *s["decode"]])
        r = json.loads(out.strip().splitlines()[-1])
        return {f"decode {k} tokens/s": v for k, v in r.items() if k != "threads"}
    if bench == "eval":
        out = _py(["-m", "benchmarks.eval_throughput", f"--worker={worker}", *s["eval"]])
        r = json.loads(out.strip().splitlines()[-1])
        return {"eval tokens/s": r["tokens_per_s"]}
    if bench == "moe":
        return parse_moe_step(_py(["-m", "benchmarks.moe_step", *s["moe"]]))
    if bench == "sst2":
        path = f"/tmp/lm_jax_suite_sst2_{os.getpid()}.json"
        _py(["-m", "benchmarks.sst2_lora_vs_full", *s["sst2"], f"--out={path}"])
        with open(path) as f:
            runs = json.load(f)["runs"]
        return {f"sst2 {k} s/step": v["step_time_s_median"] for k, v in runs.items()}
    if bench == "mfu":
        argv = [f"--mfu_worker={worker}", f"--mfu_steps={FLAGS.mfu_steps}"]
        argv += [f"--smoke={FLAGS.smoke}", f"--remat={FLAGS.remat}"]
        out = _py(["-m", "benchmarks.run_all", *argv])
        r = json.loads(out.strip().splitlines()[-1])
        return {f"mfu {worker} tokens/s": r["tokens_per_s"], f"mfu {worker} MFU %": r["mfu_pct"]}
    raise ValueError(bench)


# --------------------------------------------------------------------------- FLOPs per token


def smollm2_cfg():
    from lm_jax.configs import llama_style

    return llama_style(
        vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
        mlp_dim=1536, max_len=2048,
    )  # fmt: skip


def flops_per_token(metric: str) -> float | None:
    """Model FLOPs per token of a tokens/s metric (lm_jax.flops convention), or None."""
    from lm_jax.configs import gpt2_style
    from lm_jax.flops import flops_per_token as fpt

    if metric == "train tokens/s":
        cfg = gpt2_style(vocab_size=8192, d_model=384, num_layers=6, num_heads=6, max_len=256)
        return fpt(cfg, 256, training=True)
    if metric.startswith("decode decode_b"):  # mean context: prompt + half the new tokens
        return fpt(smollm2_cfg(), 32 + (16 if FLAGS.quick else 64) // 2, training=False)
    if metric == "decode forward tokens/s":
        return fpt(smollm2_cfg(), 64 if FLAGS.quick else 256, training=False)
    if metric == "eval tokens/s":
        return fpt(smollm2_cfg(), 256, training=False)
    return None


# --------------------------------------------------------------------------- MFU worker


def mfu_config(name: str, smoke: bool):
    """(ModelConfig, batch, seq). GPT-2 124M at seq 1024; ~1.1B Llama style at seq 2048."""
    import jax

    from lm_jax.configs import gpt2_style, llama_style

    on_gpu = jax.default_backend() in ("gpu", "tpu")
    dtype = "bfloat16" if on_gpu else "float32"
    if smoke:
        T, B = 128, 2
        if name == "gpt2_124m":
            cfg = gpt2_style(vocab_size=512, d_model=64, num_layers=2, num_heads=4, max_len=T)
        else:
            cfg = llama_style(
                vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, max_len=T
            )
    elif name == "gpt2_124m":
        T, B = 1024, 16
        cfg = gpt2_style(vocab_size=50304, d_model=768, num_layers=12, num_heads=12, max_len=T)
    else:  # 16 x (4 D^2 attn (GQA 8 of 32 heads: 2.5 D^2) + 3 D F) + V D ~= 1.1B
        T, B = 2048, 8
        cfg = llama_style(
            vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
            mlp_dim=8192, max_len=T, tie_embeddings=False, remat=FLAGS.remat,
        )  # fmt: skip
    cfg = cfg.replace(dtype=dtype, attention_impl="auto", scan_unroll=1 if on_gpu else 2)
    return cfg, B, T


def mfu_worker(name: str) -> dict:
    import jax

    from lm_jax.configs.train import TrainConfig
    from lm_jax.flops import device_peak_flops
    from lm_jax.flops import flops_per_token as fpt
    from lm_jax.optim import make_optimizer
    from lm_jax.sharding import batch_sharding, make_mesh
    from lm_jax.train.state import init_train_state
    from lm_jax.train.step import jit_train_step

    cfg, B, T = mfu_config(name, FLAGS.smoke)
    tcfg = TrainConfig(steps=1000, grad_clip=1.0)
    peak = tcfg.peak_flops or device_peak_flops()
    peak_src = "vendor bf16 peak"
    if not peak:
        peak, peak_src = matmul_peak_flops(), "measured f32 matmul probe"
    mesh = make_mesh("", devices=jax.devices()[:1])
    tx = make_optimizer(tcfg)
    state, sh = init_train_state(cfg, tx, mesh)
    bsh = batch_sharding(mesh, 2, B)
    step = jit_train_step(cfg, tcfg, tx, sh, bsh)
    batch = random_lm_batch(B, T, cfg.vocab_size)
    batch = jax.device_put(batch, bsh)
    for _ in range(2):  # compile + warm
        state, m = step(state, batch, jax.random.key(0))
    jax.block_until_ready(m["loss"])
    t = time.perf_counter()
    for _ in range(FLAGS.mfu_steps):
        state, m = step(state, batch, jax.random.key(0))
    jax.block_until_ready(m["loss"])
    tps = B * T * FLAGS.mfu_steps / (time.perf_counter() - t)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "model": name,
        "params": int(n_params),
        "batch": B,
        "seq": T,
        "dtype": cfg.dtype,
        "remat": cfg.remat,
        "device": str(jax.devices()[0].device_kind),
        "loss": float(m["loss"]),
        "tokens_per_s": tps,
        "peak_flops": peak,
        "peak_source": peak_src,
        "mfu_pct": 100 * tps * fpt(cfg, T, training=True) / peak,
    }


# --------------------------------------------------------------------------- the suite


def summarize(rounds: list[dict], probes: list[tuple[float, float]]) -> str:
    tol = FLAGS.probe_tolerance
    noisy = [abs(b / a - 1) > tol for a, b in probes]
    use = [i for i, n in enumerate(noisy) if not n] or list(range(len(rounds)))
    all_used = len(use) == len(rounds) and any(noisy)
    peak = max(max(p) for p in probes)  # the best the machine showed in this run
    metrics = sorted({k for r in rounds for w in r.values() for k in w})
    lines = [
        f"Suite run {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end; {len(rounds)} rounds, order reversed on odd "
        f"rounds; `{' '.join(['python -m benchmarks.run_all', *sys.argv[1:]])}`",
        "",
        "Noise probe (1024^3 f32 matmul through XLA, GFLOP/s, before -> after each round): "
        + ", ".join(
            f"r{i}: {a / 1e9:.0f} -> {b / 1e9:.0f}{' (noisy, dropped)' if noisy[i] else ''}"
            for i, (a, b) in enumerate(probes)
        )
        + (
            f". Every round moved more than {tol:.0%}: medians use all rounds."
            if all_used
            else f". Medians over rounds {use}."
        )
        + f" Peak for % = the highest probe, {peak / 1e9:.0f} GFLOP/s.",
        "",
        "| metric | lm_jax (median) | HF transformers PyTorch (median) | ratio (median per-round) "
        "| lm_jax % of measured matmul peak | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for k in metrics:
        ours = [rounds[i]["lm_jax"][k] for i in use if k in rounds[i].get("lm_jax", {})]
        ref = [rounds[i]["hf_torch"][k] for i in use if k in rounds[i].get("hf_torch", {})]
        other = [
            rounds[i][w][k]
            for i in use
            for w in rounds[i]
            if w not in ("lm_jax", "hf_torch") and k in rounds[i][w]
        ]
        ours = ours or other
        if not ours:
            continue
        ratio = "-"
        if ref and len(ref) == len(ours):
            ratio = f"{median([a / b for a, b in zip(ours, ref, strict=True)]):.2f}x"
        fpt = flops_per_token(k)
        pct = f"{100 * median(ours) * fpt / peak:.1f}%" if fpt else "-"
        hf = f"{median(ref):.4g}" if ref else "-"
        lines.append(f"| {k} | {median(ours):.4g} | {hf} | {ratio} | {pct} | {len(ours)} |")
    moe = {
        k: median([rounds[i]["lm_jax"][k] for i in use])
        for k in metrics
        if k.startswith(("moe ", "sst2 "))
    }
    if "moe dense ms/step" in moe:
        d = moe["moe dense ms/step"]
        rel = ", ".join(
            f"{k.split()[1]} {v / d:.2f}x"
            for k, v in moe.items()
            if k.startswith("moe ") and "dense" not in k
        )
        lines += ["", f"MoE step time relative to dense at equal active FLOPs: {rel}."]
    lora = [k for k in metrics if k.startswith("sst2 lora")]
    if lora and "sst2 full s/step" in moe:
        lines += [
            "",
            f"LoRA / full fine-tuning step time: {moe[lora[0]] / moe['sst2 full s/step']:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def main(_):
    if FLAGS.mfu_worker:
        print(json.dumps(mfu_worker(FLAGS.mfu_worker)))
        return
    todo = jobs()
    if not todo:
        raise app.UsageError(f"--only={FLAGS.only} selects no job (train decode eval moe sst2 mfu)")
    prepare({b for b, _ in todo})
    rounds, probes = [], []
    for r in range(FLAGS.rounds):
        order = todo if r % 2 == 0 else todo[::-1]
        res: dict[str, dict] = {}
        before = matmul_peak_flops()
        for bench, worker in order:
            t = time.perf_counter()
            out = run_job(bench, worker)
            res.setdefault("lm_jax" if bench in ("moe", "sst2") else worker, {}).update(out)
            print(
                f"round {r} {bench}/{worker} ({time.perf_counter() - t:.0f} s): {out}", flush=True
            )
        probes.append((before, matmul_peak_flops()))
        rounds.append(res)
    md = summarize(rounds, probes)
    print("\n" + md)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Benchmark suite (generated by benchmarks/run_all.py)\n\n" + md)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"rounds": rounds, "probes": probes}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
