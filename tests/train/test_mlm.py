"""MLM pretraining (lm_jax/train/mlm.py): rows are the corpus's ids framed by [CLS] / [SEP] with
nothing lost; a batch is a function of its step (the masks too), special tokens are never
selected and the selection rate is BERT's; a short run lowers the held-out MLM loss; the
exported folder is a transformers BertForMaskedLM giving our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs.encoder import EncoderConfig, bert_style
from lm_jax.configs.mlm import MLMConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.convert import hf_bert
from lm_jax.data.hf_tokenizer import HFTokenizer
from lm_jax.errors import ConfigError
from lm_jax.nn.encoder import Encoder
from lm_jax.sharding import make_mesh
from lm_jax.train import engine
from lm_jax.train.mlm import MLMTask, text_rows

CFG = EncoderConfig(bert_style(vocab_size=30522, d_model=32, num_layers=2, num_heads=2,
                               mlp_dim=64, max_len=64), head="mlm", pooler=False)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer.from_pretrained_dir(hf_bert.packaged_minilm_dir())


@pytest.fixture(scope="module")
def texts(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:30000]
    return [p for p in text.split("\n\n") if p.strip()]


def _task(tok, texts, tmp_path, steps=30, **kw):
    tcfg = TrainConfig(steps=steps, learning_rate=2e-3, warmup_steps=0, eval_every=0,
                       workdir=str(tmp_path), progress_bar=False, log_every=10)  # fmt: skip
    mlm = MLMConfig(batch_size=8, max_tokens=32, eval_fraction=0.1, **kw)
    return MLMTask(CFG, mlm, tcfg, tok, texts, make_mesh("", devices=jax.devices()[:1]))


def test_rows_frame_the_corpus_and_lose_nothing(tok, texts):
    rows = text_rows(tok, texts[:20], 32)
    cls, sep = tok.tk.token_to_id("[CLS]"), tok.tk.token_to_id("[SEP]")
    assert all(r[0] == cls and r[-1] == sep and len(r) <= 32 for r in rows)
    assert all(len(r) == 32 for r in rows[:-1])
    want = [i for t in texts[:20] for i in tok.encode(t, add_special_tokens=False)]
    assert [int(i) for r in rows for i in r[1:-1]] == want


def test_batches_are_a_function_of_the_step_and_mask_like_bert(tok, texts, tmp_path):
    task = _task(tok, texts, tmp_path)
    a, b = task.batch(3), task.batch(3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(task.batch(4)["labels"], a["labels"])
    mask_id = tok.tk.token_to_id("[MASK]")
    sel = n = masked = 0
    for step in range(40):
        bt = task.batch(step)
        real = bt["mask"] > 0
        special = np.isin(bt["tokens"], [101, 102]) & real  # [CLS], [SEP] stay and are not scored
        assert not np.any((bt["labels"] >= 0) & ~real)
        assert not np.any((bt["labels"] >= 0) & special)
        n += int(real.sum() - special.sum())
        sel += int((bt["labels"] >= 0).sum())
        masked += int(((bt["labels"] >= 0) & (bt["tokens"] == mask_id)).sum())
    assert abs(sel / n - 0.15) < 0.015 and abs(masked / sel - 0.8) < 0.04


def test_a_short_run_lowers_the_held_out_loss_and_exports_bert_for_masked_lm(
    tok, texts, tmp_path
):
    import torch
    import transformers

    task = _task(tok, texts, tmp_path, steps=40)
    start = task.score(task.init_state().params)
    result = engine.run(task, task.train_cfg, log=lambda s: None)
    end = result.eval
    assert end["mlm_loss"] < start["mlm_loss"] - 1.0, (start, end)
    params = jax.device_get(result.state.params)
    out = hf_bert.to_hf(CFG, params, str(tmp_path / "hf"))
    hf = transformers.BertForMaskedLM.from_pretrained(out).eval()
    ids = np.asarray([[101, 2000, 2003, 103, 1012, 102]], np.int32)
    ours = Encoder(CFG).apply({"params": params}, jnp.asarray(ids)).logits
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_config_errors(tok, texts, tmp_path):
    with pytest.raises(ConfigError, match="mlm.rate"):
        MLMConfig(rate=0.0)
    with pytest.raises(ConfigError, match="'mlm' head"):
        MLMTask(CFG.replace(head="token"), MLMConfig(), TrainConfig(), tok, texts,
                make_mesh("", devices=jax.devices()[:1]))  # fmt: skip
