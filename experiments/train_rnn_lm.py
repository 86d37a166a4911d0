"""An LSTM language model on Penn Treebank by truncated BPTT (Zaremba et al. 2014), on the one loop.

.venv/bin/python experiments/train_rnn_lm.py --preset=small --train.workdir=/tmp/lm_jax_ptb_lstm

Flags: `--preset` (small: 2 x 200, no dropout, 13 epochs, published test perplexity 114.5;
medium: 2 x 650, dropout 0.5, 39 epochs, 82.7), `--lstm.x` (LSTMConfig: hidden, num_layers,
dropout, init_scale), `--bptt.x` (BPTTConfig: batch_size, num_steps, epochs, learning_rate,
lr_decay, max_epoch, grad_clip) and `--train.x` (workdir, seed, log_every, save_every,
nonfinite). Valid perplexity is evaluated after every epoch, valid and test at the end; the
report (JSON) is printed and written to <workdir>/report.json. Killed and started again with
the same command, a run resumes from its newest checkpoint exactly (the LSTM state included).
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from lm_jax import cli
from lm_jax.configs.lstm import ZAREMBA, BPTTConfig, LSTMConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.errors import ConfigError

TRAIN_FIELDS = ("workdir", "seed", "log_every", "save_every", "nonfinite", "progress_bar")
TRAIN_FIELDS += ("log_step_details",)
F = flags.FLAGS
flags.DEFINE_enum("preset", "small", sorted(ZAREMBA), "Zaremba et al.'s configuration.")
flags.DEFINE_integer("limit_train_lines", 0, "Use only the first N training sentences (0 = all).")
flags.DEFINE_integer("limit_eval_lines", 0, "Only the first N valid / test sentences (0 = all).")
cli.define_config("lstm", LSTMConfig)
cli.define_config("bptt", BPTTConfig)
cli.define_config("train", TrainConfig, fields=TRAIN_FIELDS)


def main(_):
    from lm_jax.checkpoint import check_own_workdir
    from lm_jax.data.sources import ptb_lines
    from lm_jax.train import engine
    from lm_jax.train.rnn_lm import EOS, BPTTTask, word_stream, word_vocab

    lstm0, bptt0 = ZAREMBA[F.preset]
    tcfg = cli.config(
        "train",
        TrainConfig(workdir="/tmp/lm_jax_ptb_lstm", log_every=200, progress_bar=False),
    )
    check_own_workdir(tcfg.workdir, "lstm", "the LSTM run")
    train_lines = ptb_lines("train")
    vocab = word_vocab(train_lines)
    lstm = cli.config("lstm", dataclasses.replace(lstm0, vocab_size=len(vocab)))
    if lstm.vocab_size != len(vocab):
        raise ConfigError(f"--lstm.vocab_size must be the PTB vocabulary's {len(vocab)} words")
    bptt = cli.config("bptt", bptt0)
    if F.limit_train_lines:
        train_lines = train_lines[: F.limit_train_lines]
    n_eval = F.limit_eval_lines or None
    splits = {s: word_stream(ptb_lines(s)[:n_eval], vocab) for s in ("valid", "test")}
    train_ids = word_stream(train_lines, vocab)
    task = BPTTTask(lstm, bptt, train_ids, splits, vocab[EOS], seed=tcfg.seed)
    tcfg = dataclasses.replace(
        tcfg, steps=task.total_steps, eval_every=task.epoch_steps,
        save_every=tcfg.save_every if cli.is_set("train.save_every") else task.epoch_steps // 4,
    )  # fmt: skip
    result = engine.run(task, tcfg)
    report = {
        "preset": F.preset, "seed": tcfg.seed, "lstm": dataclasses.asdict(lstm),
        "bptt": dataclasses.asdict(bptt),
        "steps": result.step, "epochs": bptt.epochs, "resumed_from": result.resumed_from,
        **result.eval,
    }  # fmt: skip
    os.makedirs(tcfg.workdir, exist_ok=True)
    cli.print_report(report, os.path.join(tcfg.workdir, "report.json"))


if __name__ == "__main__":
    cli.run(main)
