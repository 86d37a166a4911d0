"""Sequence labelling (POS tagging, NER) with a BERT-family encoder, on the one loop.

.venv/bin/python experiments/train_tagger.py --task=pos_brown --train.workdir=/tmp/lm_jax_pos
.venv/bin/python experiments/train_tagger.py --task=ner_wnut16 --train.workdir=/tmp/lm_jax_ner
.venv/bin/python experiments/train_tagger.py --task=ner_wnut16 --from_scratch \
    --train.workdir=/tmp/lm_jax_ner_scratch

Tasks (lm_jax/train/tagging_tasks.py): pos_brown (Brown POS, split by file: test = files
numbered *5, dev = *0; accuracy on the full tag set and on base tags), ner_wnut16 (WNUT-16, a
seeded held-out split by sentence; entity F1 by seqeval), files (--train_file / --dev_file /
--test_file, CoNLL token<TAB>tag). The encoder is --init (a BERT folder or hub name; default
the packaged all-MiniLM-L6-v2), pretrained, or with --from_scratch the same architecture and
tokenizer with random weights. Labels sit on each word's first subword.
Flags: `--tagger.x` (TaggerConfig: batch_size, max_tokens, epochs, eval_batch_size,
eval_limit, pool_batches, classifier_dropout) and `--train.x` (learning_rate, steps (default:
tagger.epochs of batches), warmup_steps (default 10% of steps), lr_schedule, weight_decay,
seed, mesh, eval_every, save_every, log_every, workdir, nonfinite). The report (JSON, with
the most-frequent-tag baseline computed in the same run) is printed and written to
<workdir>/report.json. Killed and started again with the same command, a run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import flags

from lm_jax import cli
from lm_jax.configs.tagging import TaggerConfig
from lm_jax.configs.train import EXAMPLE_TASK_FIELDS, TrainConfig

F = flags.FLAGS
flags.DEFINE_enum("task", "pos_brown", ["pos_brown", "ner_wnut16", "files"], "Tagging task.")
flags.DEFINE_string("init", "minilm", "BERT-family folder or hub name (minilm = packaged).")
flags.DEFINE_bool("from_scratch", False, "Random weights in --init's architecture.")
flags.DEFINE_string("data_dir", None, "Folder with brown/ and wnut16/ (default ../shared/data).")
flags.DEFINE_string("train_file", "", "--task=files: training sentences (token<TAB>tag).")
flags.DEFINE_string("dev_file", "", "--task=files: dev sentences.")
flags.DEFINE_string("test_file", "", "--task=files: test sentences.")
flags.DEFINE_string("labels", "", "The label set, comma-separated (default: the training tags).")
flags.DEFINE_float("held_out", 0.2, "ner_wnut16: share of sentences held out for test.")
flags.DEFINE_integer("split_seed", 0, "ner_wnut16: seed of the held-out split.")
flags.DEFINE_integer("limit_train", 0, "Use only the first N training sentences (0 = all).")
flags.DEFINE_integer("limit_eval", 0, "Score only the first N dev / test sentences (0 = all).")
cli.define_config("tagger", TaggerConfig)
cli.define_config("train", TrainConfig, fields=EXAMPLE_TASK_FIELDS)


def main(_):
    from lm_jax.checkpoint import check_own_workdir
    from lm_jax.eval.tasks import DEFAULT_DATA_DIR
    from lm_jax.sharding import check_batch_divides, make_mesh
    from lm_jax.train import engine
    from lm_jax.train.tagging import TaggingTask
    from lm_jax.train.tagging_tasks import build_encoder, check_labels, load_tagging_data

    t0 = time.perf_counter()
    tagger = cli.config("tagger", TaggerConfig())
    scratch = F.from_scratch
    tcfg = cli.config("train", TrainConfig(
        workdir=f"/tmp/lm_jax_{F.task}", learning_rate=5e-4 if scratch else 5e-5,
        weight_decay=0.01, log_every=50, eval_every=0, save_every=500, progress_bar=False,
    ))  # fmt: skip
    check_own_workdir(tcfg.workdir, "tagger", "the tagger run")
    mesh = make_mesh(tcfg.mesh)
    check_batch_divides(tagger.batch_size, mesh, "tagger.batch_size")
    files = {"train": F.train_file, "dev": F.dev_file, "test": F.test_file}
    data = load_tagging_data(F.task, F.data_dir or DEFAULT_DATA_DIR, held_out=F.held_out,
                             split_seed=F.split_seed, files=files)  # fmt: skip
    if F.limit_train:
        data.splits["train"] = data.splits["train"][: F.limit_train]
    if F.limit_eval:
        for k in ("dev", "test"):
            data.splits[k] = data.splits[k][: F.limit_eval]
    labels = [x.strip() for x in F.labels.split(",") if x.strip()] or data.labels()
    unseen = check_labels(data, labels, strict=bool(F.labels))
    index = {t: i for i, t in enumerate(labels)}
    cfg, tokenizer, pretrained = build_encoder(
        F.init, len(labels), from_scratch=scratch, classifier_dropout=tagger.classifier_dropout
    )
    train = [(w, [index[t] for t in ts]) for w, ts in data.splits["train"]]
    evals = {
        k: ([w for w, _ in data.splits[k]], [t for _, t in data.splits[k]]) for k in ("dev", "test")
    }
    task = TaggingTask(cfg, tagger, tcfg, tokenizer, train, evals, labels, data.score, mesh,
                       pretrained=pretrained)  # fmt: skip
    steps = tcfg.steps if cli.is_set("train.steps") else task.steps_for(tagger.epochs)
    warmup = tcfg.warmup_steps if cli.is_set("train.warmup_steps") else steps // 10
    tcfg = dataclasses.replace(tcfg, steps=steps, warmup_steps=warmup)
    task = TaggingTask(cfg, tagger, tcfg, tokenizer, train, evals, labels, data.score, mesh,
                       pretrained=pretrained)  # fmt: skip
    baseline = data.baseline()
    result = engine.run(task, tcfg)
    report = {
        "task": F.task, "split": data.note, "init": F.init, "from_scratch": scratch,
        "labels": len(labels),
        "sentences": {k: len(v) for k, v in data.splits.items()},
        "words": {k: sum(len(w) for w, _ in v) for k, v in data.splits.items()},
        "tagger": dataclasses.asdict(tagger), "seed": tcfg.seed, "steps": result.step,
        "learning_rate": tcfg.learning_rate, "warmup_steps": warmup,
        "epochs": round(result.step / task.epoch_steps, 3), "resumed_from": result.resumed_from,
        **unseen, **result.eval,
        "most_frequent_tag_baseline": baseline,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    os.makedirs(tcfg.workdir, exist_ok=True)
    cli.print_report(report, os.path.join(tcfg.workdir, "report.json"))


if __name__ == "__main__":
    cli.run(main)
