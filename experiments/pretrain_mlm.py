r"""Masked-language-model pretraining of a BERT-family encoder (BERT's 15%, 80/10/10) on text.

.venv/bin/python experiments/pretrain_mlm.py --train.workdir=/tmp/lm_jax_mlm
.venv/bin/python experiments/pretrain_mlm.py --from_scratch --text_files=a.txt,b.txt \
    --mlm.epochs=3 --train.workdir=/tmp/lm_jax_mlm_scratch

--init: a BERT folder or hub name (default: the packaged all-MiniLM-L6-v2, whose trunk is then
trained further on the text: domain-adaptive pretraining; its MLM head starts fresh), or with
--from_scratch the same architecture and tokenizer with random weights. --text_files: plain-text
files (default: the embedded Tiny Shakespeare). The last --mlm.eval_fraction of the rows is held
out and scored (loss, perplexity, accuracy over its masked tokens) every --train.eval_every
steps and at the end. Flags: `--mlm.x` (lm_jax.configs.mlm.MLMConfig) and `--train.x`. At the
end the encoder is exported as a transformers BertForMaskedLM folder, <workdir>/hf (config,
safetensors, the tokenizer's files), which `train_tagger.py --init=<workdir>/hf` and
transformers read. Killed and started again with the same command, a run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

from absl import flags

from lm_jax import cli
from lm_jax.configs.mlm import MLMConfig
from lm_jax.configs.train import EXAMPLE_TASK_FIELDS, TrainConfig

F = flags.FLAGS
flags.DEFINE_string("init", "minilm", "BERT-family folder or hub name (minilm = packaged).")
flags.DEFINE_bool("from_scratch", False, "Random weights in --init's architecture.")
flags.DEFINE_list("text_files", [], "Plain-text training files (default: Tiny Shakespeare).")
cli.define_config("mlm", MLMConfig)
cli.define_config("train", TrainConfig, fields=EXAMPLE_TASK_FIELDS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")  # fmt: skip


def build(init: str, from_scratch: bool):
    """(EncoderConfig with the MLM head, tokenizer, pretrained params or None, its folder)."""
    import json

    from lm_jax.convert import hf_bert
    from lm_jax.data.hf_tokenizer import HFTokenizer
    from lm_jax.errors import DataSourceError

    directory = hf_bert.resolve_dir(init)
    tokenizer = HFTokenizer.from_pretrained_dir(directory)
    path = os.path.join(directory, hf_bert.CONFIG_FILE)
    if from_scratch:
        if not os.path.isfile(path):
            raise DataSourceError(f"{path!r} not found: a BERT folder needs config.json")
        with open(path) as f:
            cfg = hf_bert.config_from_hf(json.load(f), "mlm", pooler=False)
        params = None
    else:
        cfg, params = hf_bert.from_hf(directory, head=None)
        params = {k: v for k, v in params.items() if k != "pooler"}
    cfg = cfg.replace(head="mlm", pooler=False)
    return cfg.replace(model=cfg.model.replace(param_dtype="float32")), tokenizer, params, directory


def read_texts(files: list[str]) -> list[str]:
    from lm_jax.data.sources import paragraphs, read_text, shakespeare_files
    from lm_jax.errors import DataSourceError

    out = []
    for path in files or shakespeare_files():
        if not os.path.isfile(path):
            raise DataSourceError(f"--text_files: {path!r} is not a file; give plain-text files")
        out += paragraphs(read_text(path))
    if not out:
        raise DataSourceError(f"--text_files {files} hold no text")
    return out


def main(_):
    import jax

    from lm_jax.checkpoint import check_own_workdir
    from lm_jax.convert import hf_bert
    from lm_jax.sharding import check_batch_divides, make_mesh
    from lm_jax.train import engine
    from lm_jax.train.mlm import MLMTask

    t0 = time.perf_counter()
    mlm = cli.config("mlm", MLMConfig())
    scratch = F.from_scratch
    tcfg = cli.config("train", TrainConfig(
        workdir="/tmp/lm_jax_mlm", learning_rate=5e-4 if scratch else 5e-5, weight_decay=0.01,
        log_every=50, eval_every=0, save_every=500, progress_bar=False,
    ))  # fmt: skip
    check_own_workdir(tcfg.workdir, "mlm", "the MLM run")
    mesh = make_mesh(tcfg.mesh)
    check_batch_divides(mlm.batch_size, mesh, "mlm.batch_size")
    texts = read_texts(F.text_files)
    cfg, tokenizer, pretrained, src = build(F.init, scratch)
    task = MLMTask(cfg, mlm, tcfg, tokenizer, texts, mesh, pretrained=pretrained)
    steps = tcfg.steps if cli.is_set("train.steps") else task.steps_for(mlm.epochs)
    warmup = tcfg.warmup_steps if cli.is_set("train.warmup_steps") else steps // 10
    tcfg = dataclasses.replace(tcfg, steps=steps, warmup_steps=warmup)
    task = MLMTask(cfg, mlm, tcfg, tokenizer, texts, mesh, pretrained=pretrained)
    result = engine.run(task, tcfg)
    start = next((r for r in engine.read_history(tcfg.workdir)
                  if r["step"] == 0 and "mlm_loss" in r), None)  # fmt: skip
    out = os.path.join(tcfg.workdir, "hf")
    hf_bert.to_hf(cfg, jax.device_get(result.state.params), out)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), out)
    report = {
        "init": F.init, "from_scratch": scratch, "rows": len(task.rows),
        "held_out_rows": len(task.eval_rows), "mlm": dataclasses.asdict(mlm), "seed": tcfg.seed,
        "steps": result.step, "learning_rate": tcfg.learning_rate, "warmup_steps": warmup,
        "epochs": round(result.step / task.epoch_steps, 3), "resumed_from": result.resumed_from,
        "at_start": start and {k: v for k, v in start.items() if k != "step"},
        **result.eval, "exported": out,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    cli.print_report(report, os.path.join(tcfg.workdir, "report.json"))


if __name__ == "__main__":
    cli.run(main)
