"""Seq2seq training of the T5 encoder-decoder: the label-smoothed loss equals torch's
`cross_entropy(label_smoothing=...)`; pairs are framed and padded as the decoder reads them;
line-misaligned or too-long pairs are one-line errors; a tiny T5 learns to reverse digit strings
on the one loop and beam search then reverses unseen ones; 8 devices give the single-device
steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lm_jax.configs.seq2seq import Seq2SeqConfig
from lm_jax.configs.t5 import T5Config, t5_style
from lm_jax.configs.train import TrainConfig
from lm_jax.errors import DataSourceError
from lm_jax.losses import label_smoothed_nll
from lm_jax.sharding import make_mesh
from lm_jax.train import engine
from lm_jax.train.seq2seq import Seq2SeqTask, collate, encode_pairs


def test_label_smoothed_loss_equals_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 7))
    mask = (rng.random((3, 7)) > 0.3).astype(np.int32)
    for eps in (0.0, 0.1, 0.3):
        loss, nll, n = label_smoothed_nll(jnp.asarray(logits), jnp.asarray(targets),
                                          jnp.asarray(mask), eps)  # fmt: skip
        keep = mask.reshape(-1) == 1
        lt, tt = torch.tensor(logits.reshape(-1, 11)[keep]), torch.tensor(targets.reshape(-1)[keep])
        ref = torch.nn.functional.cross_entropy(lt, tt, label_smoothing=eps, reduction="sum")
        ref_nll = torch.nn.functional.cross_entropy(lt, tt, reduction="sum")
        np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
        np.testing.assert_allclose(float(nll), ref_nll.item(), rtol=1e-5)
        assert float(n) == keep.sum()


class Digits:
    """A tokenizer of digit strings: pad 0, start/unused 1, '0'..'9' -> 2..11, eos 12."""

    vocab_size = 13

    def encode(self, text):
        return [int(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(str(i - 2) for i in ids if 2 <= i <= 11)


def test_pairs_are_framed_for_the_decoder_and_bad_pairs_fail():
    tok = Digits()
    pairs = encode_pairs(tok, ["12", "345"], ["21", "543"], eos=12, max_source=8, max_target=8)
    assert pairs[0][0].tolist() == [3, 4, 12] and pairs[1][1].tolist() == [7, 6, 5, 12]
    b = collate(pairs, 4, start=0, pad=0)
    assert b["target_in"][1, :4].tolist() == [0, 7, 6, 5]  # start + target
    assert b["target_out"][1, :4].tolist() == [7, 6, 5, 12]  # target + EOS
    assert b["target_mask"].sum() == 7 and b["source_mask"][:2].sum() == 7
    with pytest.raises(DataSourceError, match="2 source lines but 1 target lines"):
        encode_pairs(tok, ["1", "2"], ["1"], 12, 8, 8)
    with pytest.raises(DataSourceError, match="train pair 0: 5 source .*max_source_len=4"):
        encode_pairs(tok, ["1234"], ["1"], 12, 4, 8)


def _reverse_task(mesh, steps=1500, seed=0, lr=3e-3):
    rng = np.random.default_rng(seed)
    strings = ["".join(map(str, rng.integers(0, 10, rng.integers(3, 7)))) for _ in range(600)]
    test = ["".join(map(str, rng.integers(0, 10, rng.integers(3, 7)))) for _ in range(40)]
    model = t5_style("relu", vocab_size=13, d_model=48, num_layers=2, num_heads=4, head_dim=12,
                     mlp_dim=96, max_len=16, initializer_range=1.0)  # fmt: skip
    cfg = T5Config(model, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   pad_token_id=0, eos_token_id=12, decoder_start_token_id=0)  # fmt: skip
    s2s = Seq2SeqConfig(batch_size=32, label_smoothing=0.0, num_beams=2, max_new_tokens=10,
                        eval_batch_size=40, max_source_len=12, max_target_len=12)  # fmt: skip
    tcfg = TrainConfig(
        steps=steps,
        learning_rate=lr,
        warmup_steps=20,
        weight_decay=0.0,
        workdir="/unused",
        log_every=1000,
        eval_every=0,
        progress_bar=False,
    )
    tok = Digits()
    train = encode_pairs(tok, strings, [s[::-1] for s in strings], 12, 12, 12)
    evals = {"test": (test, [t[::-1] for t in test])}
    return Seq2SeqTask(cfg, s2s, tcfg, tok, train, evals, mesh)


@pytest.mark.slow
def test_a_tiny_t5_learns_to_reverse_and_beam_search_translates():
    task = _reverse_task(make_mesh("data:1", jax.devices()[:1]))
    res = engine.run(task, task.train_cfg, log=lambda *_: None, save=False)
    src, ref = task.evals["test"]
    hyps = task.translate(res.state, src)
    exact = np.mean([h == r for h, r in zip(hyps, ref)])
    assert exact > 0.8, list(zip(src, hyps))[:5]
    assert res.eval["test_chrf"] > 80


def test_eight_devices_give_the_single_device_steps():
    def run(mesh):
        task = _reverse_task(mesh, steps=3)
        state, losses = task.init_state(), []
        for s in range(3):
            state, m = task.train_step(state, s)
            losses.append(float(m["loss"]))
        return losses, jax.device_get(state.params)

    one, p1 = run(make_mesh("data:1", jax.devices()[:1]))
    eight, p8 = run(make_mesh("data:8"))
    np.testing.assert_allclose(one, eight, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # Adam: tiny grads, sign-like steps


def test_a_source_past_the_limit_and_a_decode_past_the_cache_are_one_line_errors():
    from lm_jax.errors import ConfigError
    from lm_jax.train.seq2seq import translate

    task = _reverse_task(make_mesh("data:1", jax.devices()[:1]), steps=1)
    with pytest.raises(DataSourceError, match=r"source 1 has 13 tokens .*max_source_len=12"):
        translate(task.cfg, task.s2s, None, Digits(), ["12", "1" * 12], task.mesh)
    long = dataclasses.replace(task.s2s, max_new_tokens=17)  # t5.model.max_len is 16
    with pytest.raises(ConfigError, match=r"max_new_tokens=17 is past .*max_len=16"):
        Seq2SeqTask(task.cfg, long, task.train_cfg, Digits(), task.train, {}, task.mesh)
