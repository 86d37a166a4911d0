"""T5 span-corruption pretraining (lm_jax/train/span_corruption.py): rows cover the text; every
step's pairs are a function of the step and rebuild their rows (sentinels after the vocabulary,
<extra_id_0> the last id); a short run lowers the held-out loss; a vocabulary without room for
the sentinels is a one-line error."""

import jax
import numpy as np
import pytest

from lm_jax.configs.seq2seq import Seq2SeqConfig, SpanConfig
from lm_jax.configs.t5 import T5Config, t5_style
from lm_jax.configs.train import TrainConfig
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.errors import ConfigError
from lm_jax.sharding import make_mesh
from lm_jax.train import engine
from lm_jax.train.span_corruption import SpanCorruptionTask, text_rows

TOK = ByteTokenizer()
SPAN = SpanConfig(row_tokens=32, num_sentinels=8, eval_fraction=0.1)
CFG = T5Config(model=t5_style("relu", vocab_size=TOK.vocab_size + 8, d_model=48, num_layers=2,
                              num_heads=4, head_dim=12, mlp_dim=96, max_len=64),
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip


@pytest.fixture(scope="module")
def texts(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:6000]
    return [line + "\n" for line in text.splitlines() if line.strip()]


def _task(texts, tmp_path, steps=10):
    tcfg = TrainConfig(steps=steps, learning_rate=3e-3, warmup_steps=0, eval_every=0,
                       workdir=str(tmp_path), progress_bar=False, log_every=10)  # fmt: skip
    s2s = Seq2SeqConfig(batch_size=8, pool_batches=2, max_new_tokens=16)
    rows = text_rows(TOK, texts, SPAN.row_tokens)
    return SpanCorruptionTask(CFG, s2s, SPAN, tcfg, TOK, rows, make_mesh("", jax.devices()[:1]))


def _rebuild(source, target, first_sentinel):
    spans, cur = {}, None
    for t in target[:-1]:
        if t > first_sentinel - SPAN.num_sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    return [x for t in source[:-1] for x in (spans[t] if t in spans else [t])]


def test_rows_cover_the_text_and_pairs_rebuild_them(texts, tmp_path):
    rows = text_rows(TOK, texts, 32)
    assert [int(i) for r in rows for i in r] == [i for t in texts for i in TOK.encode(t)]
    task = _task(texts, tmp_path)
    first = CFG.model.vocab_size - 1
    a, b = task.batch(2), task.batch(2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(task.batch(3)["source"], a["source"])
    for i in range(5):
        src, tgt = task.corrupt(task.rows[i], np.random.default_rng(i))
        assert src[-1] == tgt[-1] == CFG.eos_token_id and tgt[0] == first
        assert _rebuild(list(src), list(tgt), first) == [int(t) for t in task.rows[i]]
    # the batch's target rows: each starts with <extra_id_0> after the decoder's start token
    real = a["target_mask"].sum(1) > 0
    assert np.all(a["target_out"][real, 0] == first) and np.all(a["target_in"][real, 0] == 0)


def test_a_short_run_lowers_the_held_out_loss(texts, tmp_path):
    task = _task(texts, tmp_path, steps=40)
    start = task.evaluate(task.init_state(), 0)["val_loss"]
    result = engine.run(task, task.train_cfg, log=lambda s: None)
    assert result.eval["val_loss"] < start - 1.0, (start, result.eval)


def test_the_vocabulary_must_hold_the_sentinels(texts, tmp_path):
    bad = CFG.replace(model=CFG.model.replace(vocab_size=TOK.vocab_size))
    with pytest.raises(ConfigError, match="tokenizer's 257 \\+ span.num_sentinels 8"):
        SpanCorruptionTask(bad, Seq2SeqConfig(max_new_tokens=16), SPAN, TrainConfig(), TOK,
                           text_rows(TOK, texts, 32), make_mesh("", jax.devices()[:1]))  # fmt: skip
    with pytest.raises(ConfigError, match="num_sentinels is fewer"):
        SpanConfig(row_tokens=512, num_sentinels=4)
    # a row longer than the config allows for would need sentinels below the vocabulary's top
    task = _task(texts, tmp_path)
    with pytest.raises(ConfigError, match="noise spans but span.num_sentinels=8"):
        task.corrupt(np.arange(2, 400, dtype=np.int32), np.random.default_rng(0))
