"""The LSTM LM (lm_jax.nn.lstm) against torch.nn.LSTM with the same weights, the carried state
(windows == one long sequence), and its truncated-BPTT task on the one loop: it learns, and a
run stopped and resumed across an epoch boundary equals the uninterrupted run to the bit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lm_jax.configs.lstm import ZAREMBA, BPTTConfig, LSTMConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.errors import ConfigError
from lm_jax.nn.lstm import LSTMLM, zero_carry
from lm_jax.train import engine
from lm_jax.train.rnn_lm import BPTTTask, stream_nll, word_stream, word_vocab

CFG = LSTMConfig(vocab_size=37, hidden=12, num_layers=2, init_scale=0.3)


def _params(cfg=CFG, seed=0):
    x = jnp.zeros((1, 2), jnp.int32)
    return LSTMLM(cfg).init(jax.random.key(seed), x, zero_carry(cfg, 1))["params"]


def _random_carry(cfg, B, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(
        tuple(jnp.asarray(rng.normal(size=(B, cfg.hidden)), jnp.float32) for _ in range(2))
        for _ in range(cfg.num_layers)
    )


def _torch_lstm(cfg, params):
    """torch.nn.LSTM (gates i, f, g, o) with our kernels; our biases are on the recurrent side."""
    lstm = torch.nn.LSTM(cfg.hidden, cfg.hidden, cfg.num_layers, batch_first=True)
    with torch.no_grad():
        for k in range(cfg.num_layers):
            p = params[f"lstm_{k}"]
            w_ih = np.concatenate([np.asarray(p[f"i{g}"]["kernel"]).T for g in "ifgo"])
            w_hh = np.concatenate([np.asarray(p[f"h{g}"]["kernel"]).T for g in "ifgo"])
            b_hh = np.concatenate([np.asarray(p[f"h{g}"]["bias"]) for g in "ifgo"])
            getattr(lstm, f"weight_ih_l{k}").copy_(torch.from_numpy(w_ih))
            getattr(lstm, f"weight_hh_l{k}").copy_(torch.from_numpy(w_hh))
            getattr(lstm, f"bias_ih_l{k}").zero_()
            getattr(lstm, f"bias_hh_l{k}").copy_(torch.from_numpy(b_hh))
    return lstm


def test_logits_and_state_equal_torch_lstm():
    params = _params()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (3, 9)).astype(np.int32)
    carry = _random_carry(CFG, 3)
    logits, new = LSTMLM(CFG).apply({"params": params}, tokens, carry)
    lstm = _torch_lstm(CFG, params)
    emb = torch.from_numpy(np.asarray(params["embed"]["embedding"])[tokens])
    h0 = torch.from_numpy(np.stack([np.asarray(c[1]) for c in carry]))
    c0 = torch.from_numpy(np.stack([np.asarray(c[0]) for c in carry]))
    with torch.no_grad():
        out, (hn, cn) = lstm(emb, (h0, c0))
        w, b = (torch.from_numpy(np.asarray(params["softmax"][k])) for k in ("kernel", "bias"))
        want = out @ w + b
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-5)
    for k in range(CFG.num_layers):
        np.testing.assert_allclose(new[k][0], cn[k].numpy(), atol=1e-5)
        np.testing.assert_allclose(new[k][1], hn[k].numpy(), atol=1e-5)


def test_carried_windows_equal_one_sequence_and_stream_nll():
    params = _params()
    rng = np.random.default_rng(2)
    ids = rng.integers(0, CFG.vocab_size, 50).astype(np.int32)
    model = LSTMLM(CFG)
    whole, _ = model.apply({"params": params}, ids[None, :], zero_carry(CFG, 1))
    carry, parts = zero_carry(CFG, 1), []
    for s in range(0, 50, 7):  # windows of 7 (the last shorter), state carried
        out, carry = model.apply({"params": params}, ids[None, s : s + 7], carry)
        parts.append(out)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), whole, atol=1e-5)
    seq = np.concatenate([[3], ids])
    lp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, seq[None, :-1],
                                                   zero_carry(CFG, 1))[0][0], -1))  # fmt: skip
    want = -lp[np.arange(50), seq[1:]].sum()
    got, n = stream_nll(params, CFG, ids, start=3, chunk=16)  # 16 does not divide 50
    assert n == 50 and got == pytest.approx(want, rel=1e-5)


def _task(steps_epochs=3, seed=0):
    lines = ["a b c d a b", "c d e a", "b a e e d c", "a b c"] * 30
    vocab = word_vocab(lines)
    ids = word_stream(lines, vocab)
    cfg = dataclasses.replace(CFG, vocab_size=len(vocab), dropout=0.2)
    bptt = BPTTConfig(batch_size=4, num_steps=5, epochs=steps_epochs, max_epoch=2, lr_decay=0.5)
    return BPTTTask(cfg, bptt, ids, {"valid": ids[:60]}, vocab["<eos>"], seed=seed, eval_chunk=32)


def test_bptt_learns_and_resumes_exactly_across_an_epoch(tmp_path):
    task = _task()
    assert task.epoch_steps == (len(task.data[0]) - 1) // 5
    steps = task.total_steps
    tc = TrainConfig(steps=steps, log_every=5, eval_every=0, save_every=0, progress_bar=False,
                     async_checkpointing=False)  # fmt: skip
    straight = engine.run(task, dataclasses.replace(tc, workdir=str(tmp_path / "a")), save=False)
    losses = [r["train/loss"] for r in straight.history if "train/loss" in r]
    assert losses[0] == pytest.approx(np.log(task.cfg.vocab_size), rel=0.05)  # uniform at first
    assert np.mean(losses[-10:]) < 0.85 * losses[0]
    assert straight.eval["valid_ppl"] < 0.75 * task.cfg.vocab_size
    half = task.epoch_steps + 3  # past the first epoch boundary (state reset, lr decayed)
    wd = str(tmp_path / "b")
    engine.run(_task(), dataclasses.replace(tc, workdir=wd, steps=half, save_every=half))
    resumed = engine.run(_task(), dataclasses.replace(tc, workdir=wd))
    assert resumed.resumed_from == half
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="num_layers >= 1"):
        LSTMConfig(num_layers=0)
    with pytest.raises(ConfigError, match="dropout must be"):
        LSTMConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="lr_decay"):
        BPTTConfig(lr_decay=0.0)
    with pytest.raises(ConfigError, match="no window"):
        BPTTTask(CFG, BPTTConfig(batch_size=20, num_steps=35), np.zeros(100, np.int32), {}, 0)
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        word_stream(["a z"], {"a": 0, "<eos>": 1})
    small, medium = ZAREMBA["small"], ZAREMBA["medium"]
    assert (small[0].hidden, small[1].epochs, medium[0].hidden, medium[1].num_steps) == (
        200, 13, 650, 35,
    )  # fmt: skip
