"""Train a T5-family encoder-decoder from scratch on translation pairs, or pretrain one by span
corruption, on the one loop.

.venv/bin/python experiments/train_seq2seq.py --task=multi30k_en_de \
    --train.workdir=/tmp/lm_jax_m30k
.venv/bin/python experiments/train_seq2seq.py --task=span_corruption \
    --text_files=a.txt,b.txt --train.workdir=/tmp/lm_jax_t5_span

--task=span_corruption: T5's pretraining objective (lm_jax/train/span_corruption.py) on plain
text (--text_files, one sentence or paragraph a line; default the Multi30k training sentences,
English and German); `--span.x` (SpanConfig: row_tokens, noise_density, mean_span_length,
num_sentinels, eval_fraction); the sentinels are ids after the SentencePiece vocabulary; the
report gives the held-out rows' loss and perplexity.

Tasks: multi30k_en_de (Multi30k task 1, 29,000 training pairs; BLEU on val and
test_2016_flickr) or files (--train_files=SRC,TGT, --val_files=SRC,TGT, --test_files=SRC,TGT:
line-aligned plain text). A joint SentencePiece BPE vocabulary (--vocab_size) is trained on the
training sources and targets and saved in <workdir>/tokenizer (a resumed run reads it back).
Flags: `--t5.x` (T5Config: model.d_model, model.num_layers, num_decoder_layers, model.dropout,
relative_attention_num_buckets, ...), `--seq2seq.x` (Seq2SeqConfig: batch_size, epochs,
label_smoothing, num_beams, length_penalty, max_new_tokens, eval_limit, ...) and `--train.x`
(learning_rate, steps, warmup_steps, seed, mesh, eval_every, save_every, workdir, ...). The report
(JSON: BLEU / chrF by sacrebleu, validation loss and perplexity, wall time) is printed and
written to <workdir>/report.json. Killed and started again with the same command, a run resumes
exactly.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import time

from absl import flags

from lm_jax import cli
from lm_jax.configs.seq2seq import Seq2SeqConfig, SpanConfig
from lm_jax.configs.t5 import T5Config, t5_style
from lm_jax.configs.train import EXAMPLE_TASK_FIELDS, TrainConfig
from lm_jax.errors import ConfigError, DataSourceError

F = flags.FLAGS
flags.DEFINE_enum("task", "multi30k_en_de", ["multi30k_en_de", "files", "span_corruption"],
                  "Translation task, or span-corruption pretraining.")
flags.DEFINE_list("text_files", [], "--task=span_corruption: plain-text files (default: the "
                  "Multi30k training sentences, en and de).")
flags.DEFINE_string("data_dir", None, "Folder with multi30k/ (default ../shared/data).")
flags.DEFINE_list("train_files", [], "--task=files: SOURCE,TARGET training files.")
flags.DEFINE_list("val_files", [], "--task=files: SOURCE,TARGET validation files.")
flags.DEFINE_list("test_files", [], "--task=files: SOURCE,TARGET test files.")
flags.DEFINE_integer("vocab_size", 8000, "Joint SentencePiece BPE vocabulary.")
flags.DEFINE_integer("limit_train", 0, "Use only the first N training pairs (0 = all).")

# Multi30k: a small T5 (3 + 3 layers, d 256, ReLU FF 1024, dropout 0.1) from scratch.
MULTI30K = T5Config(
    model=t5_style("relu", vocab_size=8000, d_model=256, num_layers=3, num_heads=4,
                   head_dim=64, mlp_dim=1024, max_len=128, dropout=0.1),  # fmt: skip
    pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
)  # fmt: skip
cli.define_config("t5", T5Config)
cli.define_config("seq2seq", Seq2SeqConfig)
cli.define_config("span", SpanConfig)
cli.define_config("train", TrainConfig, fields=EXAMPLE_TASK_FIELDS)


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataSourceError(f"text file {path!r} not found; give line-aligned plain text files")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataSourceError(f"{path}: cannot read it as UTF-8 text ({e})") from e


def _pair_files(flag: str, value: list[str]) -> tuple[list[str], list[str]]:
    if len(value) != 2:
        raise ConfigError(f"--{flag} takes SOURCE,TARGET (two files), got {','.join(value)!r}")
    src, tgt = map(_read_lines, value)
    if len(src) != len(tgt):
        raise DataSourceError(
            f"--{flag}: {len(src)} source lines but {len(tgt)} target lines; the files must be "
            "line-aligned"
        )
    return src, tgt


def load_splits() -> dict:
    if F.task == "span_corruption":
        if F.text_files:
            lines = [x for path in F.text_files for x in _read_lines(path) if x.strip()]
        else:
            d = load_splits_multi30k()["train"]
            lines = d[0] + d[1]
        if not lines:
            raise DataSourceError(f"--text_files {F.text_files} hold no text")
        return {"text": lines}
    if F.task == "files":
        out = {"train": _pair_files("train_files", F.train_files)}
        for name, flag in (("val", "val_files"), ("test", "test_files")):
            if getattr(F, flag):
                out[name] = _pair_files(flag, getattr(F, flag))
        return out
    return load_splits_multi30k()


def load_splits_multi30k() -> dict:
    from lm_jax.errors import EvalError
    from lm_jax.eval.tasks import DEFAULT_DATA_DIR, load_multi30k

    d = F.data_dir or DEFAULT_DATA_DIR
    try:
        return {s if s != "test_2016_flickr" else "test": load_multi30k(d, s)
                for s in ("train", "val", "test_2016_flickr")}  # fmt: skip
    except EvalError as e:
        raise DataSourceError(str(e)) from e


def main(_):
    from lm_jax.checkpoint import check_own_workdir
    from lm_jax.data.sp_tokenizer import SentencePieceTokenizer
    from lm_jax.data.tokenizer import load_tokenizer
    from lm_jax.sharding import check_batch_divides, make_mesh
    from lm_jax.train import engine
    from lm_jax.train.seq2seq import Seq2SeqTask, encode_pairs
    from lm_jax.train.span_corruption import SpanCorruptionTask, text_rows

    t0 = time.perf_counter()
    s2s = cli.config("seq2seq", Seq2SeqConfig())
    tcfg = cli.config("train", TrainConfig(
        workdir=f"/tmp/lm_jax_{F.task}", learning_rate=1e-3, warmup_steps=500,
        weight_decay=0.01, log_every=100, eval_every=0, save_every=500, progress_bar=False,
    ))  # fmt: skip
    check_own_workdir(tcfg.workdir, "seq2seq", "the seq2seq run")
    mesh = make_mesh(tcfg.mesh)
    check_batch_divides(s2s.batch_size, mesh, "seq2seq.batch_size")
    splits = load_splits()
    span = cli.config("span", SpanConfig())
    pretrain = F.task == "span_corruption"
    if pretrain:
        texts = splits["text"][: F.limit_train or None]
        corpus = texts
    else:
        src, tgt = splits["train"]
        if F.limit_train:
            src, tgt = src[: F.limit_train], tgt[: F.limit_train]
        corpus = src + tgt
    tok_dir = os.path.join(tcfg.workdir, "tokenizer")
    if os.path.isdir(tok_dir):
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = SentencePieceTokenizer.train(corpus, vocab_size=F.vocab_size)
    extra = span.num_sentinels if pretrain else 0  # sentinel ids after the vocabulary
    base = dataclasses.replace(
        MULTI30K, model=MULTI30K.model.replace(vocab_size=tokenizer.vocab_size + extra)
    )
    cfg = cli.config("t5", base)
    if cfg.model.vocab_size != tokenizer.vocab_size + extra:
        raise ConfigError(
            f"--t5.model.vocab_size must be the tokenizer's {tokenizer.vocab_size}"
            f"{f' + {extra} sentinels' if extra else ''}; set --vocab_size instead"
        )
    if pretrain:
        rows = text_rows(tokenizer, [t + "\n" for t in texts], span.row_tokens)
        make = lambda tc: SpanCorruptionTask(cfg, s2s, span, tc, tokenizer, rows, mesh)  # noqa: E731
        items = {"rows": len(rows)}
    else:
        train = encode_pairs(tokenizer, src, tgt, cfg.eos_token_id, s2s.max_source_len,
                             s2s.max_target_len)  # fmt: skip
        evals = {k: v for k, v in splits.items() if k != "train"}
        make = lambda tc: Seq2SeqTask(cfg, s2s, tc, tokenizer, train, evals, mesh)  # noqa: E731
        items = {"pairs": len(train)}
    task = make(tcfg)
    steps = tcfg.steps if cli.is_set("train.steps") else task.steps_for(s2s.epochs)
    warmup = min(tcfg.warmup_steps, steps // 5)
    tcfg = dataclasses.replace(tcfg, steps=steps, warmup_steps=warmup)
    task = make(tcfg)
    if not os.path.isdir(tok_dir):
        tokenizer.save(tok_dir)
    result = engine.run(task, tcfg)
    report = {
        "task": F.task, **items, "vocab_size": tokenizer.vocab_size,
        "t5": cfg.to_dict(), "seq2seq": dataclasses.asdict(s2s),
        **({"span": dataclasses.asdict(span)} if pretrain else {}), "seed": tcfg.seed,
        "steps": result.step, "learning_rate": tcfg.learning_rate, "warmup_steps": warmup,
        "epochs": round(result.step / task.epoch_steps, 3), "resumed_from": result.resumed_from,
        **result.eval, "examples": getattr(task, "examples", []),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    cli.print_report(report, os.path.join(tcfg.workdir, "report.json"))


if __name__ == "__main__":
    cli.run(main)
