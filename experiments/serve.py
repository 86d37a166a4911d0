r"""Serve a model behind an OpenAI-compatible HTTP API, with continuous batching.

python experiments/serve.py                                   # SmolLM2-135M on 127.0.0.1:8000
python experiments/serve.py --gguf=/models/x.gguf --engine.slots=32 --serve.port=8080
python experiments/serve.py --checkpoint=/tmp/run --serve.chat_template=chatml
python experiments/serve.py --adapters=chat=/tmp/chat_sft,math=/tmp/grpo_arith  # LoRA per request

Then any OpenAI client:
    from openai import OpenAI
    c = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}])

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream, logprobs,
n, stop, seed, top_k), GET /health. `--engine.*`: slots, max_len, decode_steps, top_logprobs
(lm_jax.serving.engine.EngineConfig); `--serve.*`: host, port, model_name, max_pending,
chat_template, drain_timeout (lm_jax.serving.runner.ServeConfig). `--adapters=name=dir,...`:
LoRA adapters (fine-tuning workdirs or their adapters folders) over the base, each served as
the model `name`; requests on different adapters share the running batch (lm_jax.adapters.rows).
SIGTERM (or Ctrl-C) stops accepting connections and drains: requests in flight run to their end
before the process exits.
Needs the `serve` extra (`pip install -e .[serve]`: fastapi, uvicorn).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

from lm_jax import cli
from lm_jax.errors import ConfigError
from lm_jax.serving.engine import EngineConfig
from lm_jax.serving.runner import ServeConfig

flags.DEFINE_string("checkpoint", None, "lm_jax training workdir (newest checkpoint).")
flags.DEFINE_string("hf_dir", None, "Local transformers folder (config.json, safetensors).")
flags.DEFINE_string("gguf", None, "GGUF file or name: smollm2 (default, no source given), gemma3.")
flags.DEFINE_list("adapters", [], "LoRA adapters served per request: name=dir (a LoRA "
                  "fine-tuning workdir or its adapters folder), comma-separated.")
cli.define_config("engine", EngineConfig)
cli.define_config("serve", ServeConfig)
FLAGS = flags.FLAGS


def load():
    from lm_jax.convert.gguf import smollm2_gguf_path
    from lm_jax.convert.sources import load_any

    srcs = {n: FLAGS[n].value or "" for n in ("checkpoint", "hf_dir", "gguf")}
    default = not any(srcs.values())
    if default:
        srcs["gguf"] = smollm2_gguf_path()
    cfg, params, tok, source = load_any(**srcs)
    path = source.split(":", 1)[1].rstrip("/")
    name = "smollm2-135m" if default else os.path.splitext(os.path.basename(path))[0]
    return cfg, params, tok, name


def load_adapters(specs: list[str]) -> dict:
    """{name: (adapter tree, LoraConfig)} from --adapters=name=dir,... (checked, one line)."""
    from lm_jax.convert.sources import find_adapters

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapters entry {spec!r} is not name=dir: e.g. "
                              "--adapters=chat=/tmp/chat_sft.")  # fmt: skip
        if name in out:
            raise ConfigError(f"--adapters name {name!r} is used twice: give each adapter its "
                              "own name.")  # fmt: skip
        ad, lora_cfg, _ = find_adapters(path, flag=f"--adapters={name}")
        out[name] = (ad, lora_cfg)
    return out


def check(scfg: ServeConfig) -> None:
    if not 0 < scfg.port < 65536:
        raise ConfigError(f"--serve.port must be in 1..65535, got {scfg.port}.")
    if scfg.max_pending < 1:
        raise ConfigError(f"--serve.max_pending must be >= 1, got {scfg.max_pending}.")
    if scfg.drain_timeout <= 0:
        raise ConfigError(f"--serve.drain_timeout must be > 0 seconds, got {scfg.drain_timeout}.")


def main(argv):
    ecfg = cli.config("engine", EngineConfig())
    scfg = cli.config("serve", ServeConfig())
    check(scfg)
    try:
        import uvicorn

        from lm_jax.serving.app import make_app
    except ImportError as e:
        raise ConfigError(
            f"serving needs the serve extra ({e.name} is missing): pip install -e '.[serve]'."
        ) from None
    from lm_jax.data.chat_template import resolve_template
    from lm_jax.serving.engine import Engine, Request
    from lm_jax.serving.runner import Runner

    adapters = load_adapters(FLAGS.adapters)  # before the model: a bad entry fails fast
    cfg, params, tok, name = load()
    if (scfg.model_name or name) in adapters:
        raise ConfigError(f"--adapters name {scfg.model_name or name!r} is the base model's id: "
                          "rename the adapter (or set --serve.model_name).")  # fmt: skip
    template = resolve_template(scfg.chat_template, tok) if scfg.chat_template else None
    if ecfg.max_len > cfg.max_len:  # the default 1024 on a shorter model: use what it has
        if cli.is_set("engine.max_len"):
            ecfg.check(cfg.max_len)
        ecfg = dataclasses.replace(ecfg, max_len=cfg.max_len)
    engine = Engine(cfg, params, ecfg, adapters=adapters or None)
    warm = [0 if tok.bos_id is None else tok.bos_id]
    engine.run([Request(warm, max_tokens=ecfg.decode_steps + 1, temperature=0.0)])  # compile
    runner = Runner(engine, scfg.max_pending).start()
    app = make_app(runner, tok, scfg.model_name or name, template)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=scfg.host, port=scfg.port, log_level="warning",
            timeout_graceful_shutdown=scfg.drain_timeout,
        )
    )  # fmt: skip
    print(
        f"serving {scfg.model_name or name} on http://{scfg.host}:{scfg.port}/v1 "
        f"({ecfg.slots} slots, max_len {ecfg.max_len}"
        + (f"; adapters {', '.join(sorted(adapters))}" if adapters else "") + ")",
        flush=True,
    )
    try:
        server.run()
    finally:
        runner.close(drain=True)
    print("drained; bye", file=sys.stderr, flush=True)


if __name__ == "__main__":
    cli.run(main)
