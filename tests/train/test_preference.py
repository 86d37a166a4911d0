"""Preference optimisation: the losses against their formulas on hand-computed values (SimPO's
reference-free loss, DPO's label smoothing, IPO's per-token normalisation), pair rows and their
truncation rules, the JSONL reader's one-line errors, the default pairs, and short DPO / SimPO
runs on the one loop (LoRA base frozen, the reference scored once and cached)."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax import adapters as L
from lm_jax.checkpoint import CheckpointMismatch
from lm_jax.configs import ConfigError, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.losses_preference import PairLogps, dpo_loss, ipo_loss, preference_loss, simpo_loss
from lm_jax.nn import Transformer
from lm_jax.optim import make_optimizer
from lm_jax.scoring import Scorer
from lm_jax.sharding import make_mesh
from lm_jax.train import preference as P
from lm_jax.train.preference_data import (
    PreferenceBatches,
    PreferenceConfig,
    PreferencePair,
    encode_pair,
    make_pair_batch,
    read_preference_jsonl,
    text_pairs,
)
from lm_jax.train.preference_step import pair_logps, score_pairs, train_step
from lm_jax.train.state import init_train_state

TOK = ByteTokenizer()
CFG = llama_style(vocab_size=257, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_len=64, initializer_range=0.2)  # fmt: skip
WORDS = ["apple", "storm", "quiet", "ember", "lunar", "frost", "maple", "cider"]
PAIRS = [PreferencePair(f"{w}: ", w.upper(), w[::-1]) for w in WORDS]


def logsig(x):
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- losses


def test_simpo_matches_its_formula_on_hand_computed_values():
    pc, pr = jnp.asarray([-4.0, -9.0]), jnp.asarray([-6.0, -8.0])
    nc, nr = jnp.asarray([2.0, 3.0]), jnp.asarray([3.0, 2.0])
    # mean token log-probs: chosen (-2, -3), rejected (-2, -4); beta 2, gamma 1:
    # z = 2 * (0) - 1 = -1 and 2 * (1) - 1 = 1
    loss, m = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=1.0)
    want = (math.log1p(math.e) + math.log1p(math.exp(-1))) / 2  # 0.8132617
    assert abs(float(loss) - want) < 1e-6 and abs(want - 0.8132617) < 1e-6
    assert float(m["reward_chosen"]) == -5.0 and float(m["reward_rejected"]) == -6.0
    assert float(m["reward_margin"]) == 1.0 and float(m["accuracy"]) == 0.5  # a tie is wrong
    # label smoothing 0.1: 0.9 * -logsig(z) + 0.1 * -logsig(-z)
    loss, _ = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=1.0, label_smoothing=0.1)
    want = sum(-0.9 * logsig(z) - 0.1 * logsig(-z) for z in (-1.0, 1.0)) / 2
    assert abs(float(loss) - want) < 1e-6
    # gradient: dL/dpc_i = (sigmoid(z_i) - 1) * beta / (nc_i * B); no reference anywhere
    g = jax.grad(lambda x: simpo_loss(x, pr, nc, nr, beta=2.0, gamma=1.0)[0])(pc)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want_g = [(sig(-1.0) - 1) * 2 / (2 * 2), (sig(1.0) - 1) * 2 / (3 * 2)]
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-6)
    loss2, m2 = preference_loss("simpo", PairLogps(pc, pr, nc, nr), None, beta=2.0, gamma=1.0)
    assert float(loss2) == float(simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=1.0)[0])
    assert set(m2) >= {"loss", "accuracy", "reward_margin"}


def test_dpo_and_ipo_match_their_formulas():
    pc, pr, rc, rr = map(jnp.asarray, ([-3.0, -5.0], [-4.0, -4.0], [-3.5, -4.0], [-3.0, -4.5]))
    # log-ratios: chosen (0.5, -1), rejected (-1, 0.5); z = 1.5, -1.5
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    want = -(logsig(0.75) + logsig(-0.75)) / 2
    assert abs(float(loss) - want) < 1e-6
    np.testing.assert_allclose(float(m["reward_margin"]), 0.0, atol=1e-7)  # 0.75 and -0.75
    assert float(m["accuracy"]) == 0.5 and float(m["reward_chosen"]) == pytest.approx(-0.125)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    want = sum(-0.8 * logsig(z) - 0.2 * logsig(-z) for z in (0.75, -0.75)) / 2
    assert abs(float(loss) - want) < 1e-6
    # IPO: per-token log-ratios; counts chosen (2, 4), rejected (1, 5); beta 0.25: target 2
    nc, nr = jnp.asarray([2.0, 4.0]), jnp.asarray([1.0, 5.0])
    loss, m = ipo_loss(pc, pr, rc, rr, nc, nr, beta=0.25)
    z = [0.5 / 2 - (-1.0) / 1, -1.0 / 4 - 0.5 / 5]
    want = sum((x - 2.0) ** 2 for x in z) / 2
    assert abs(float(loss) - want) < 1e-6
    assert float(m["reward_chosen"]) == pytest.approx(0.25 * (0.5 - 1.0) / 2)
    with pytest.raises(ConfigError, match="reference"):
        preference_loss("dpo", PairLogps(pc, pr, nc, nr), None)
    with pytest.raises(ConfigError, match="unknown preference method"):
        preference_loss("kto", PairLogps(pc, pr, nc, nr), None)


# ----------------------------------------------------------------------------- data


def test_pair_rows_mask_completions_and_truncate_by_the_rules():
    e = encode_pair(TOK, PreferencePair("abc", "XY", "Z"), seq_len=8)
    assert not e.truncated and e.chosen[1] == e.rejected[1] == 3
    b = make_pair_batch([e], seq_len=8, refs=(np.asarray([-1.0]), np.asarray([-2.0])))
    c, r = b["chosen"], b["rejected"]
    assert c["inputs"].shape == r["inputs"].shape == (1, 8)
    np.testing.assert_array_equal(c["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(r["loss_mask"][0], [0, 0, 1, 0, 0, 0, 0, 0])
    assert c["targets"][0, 2] == ord("X") and r["targets"][0, 2] == ord("Z")
    assert b["ref_chosen"].dtype == np.float32 and float(b["ref_rejected"][0]) == -2.0
    # rule 2: the prompt loses its oldest tokens (both rows the same), whole completions kept
    e = encode_pair(TOK, PreferencePair("abcdefgh", "XY", "Z"), seq_len=6)
    assert e.truncated and e.chosen[1] == 5 and TOK.decode(e.chosen[0].tolist()) == "defghXY"
    assert TOK.decode(e.rejected[0].tolist()) == "defghZ"
    # rule 3: the prompt keeps max(1, seq_len // 2) = 3 tokens, the completion loses its end
    e = encode_pair(TOK, PreferencePair("abcdefgh", "0123456789", "Z"), seq_len=6)
    assert TOK.decode(e.chosen[0].tolist()) == "fgh0123" and e.chosen[1] == 3
    with pytest.raises(ConfigError, match="rejected completion '' .*non-empty"):
        encode_pair(TOK, PreferencePair("abc", "x", ""), seq_len=8)


def test_jsonl_reader_errors_name_the_line_and_the_fix(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n')
    assert read_preference_jsonl(str(f)) == [PreferencePair("a", "b", "c")]
    for text, pattern in [
        ('{"prompt": "a", "chosen": "b"}\n', r"p\.jsonl:1: missing key 'rejected'"),
        ('{"prompt": "a", "chosen": "", "rejected": "c"}\n', r":1: 'chosen' is empty"),
        ('{"prompt": "a", "chosen": "b", "rejected": 3}\n', r"'rejected' must be a string"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt"\n', r"p\.jsonl:2: not JSON"),
        ("\n", r"holds no preference pairs"),
    ]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=pattern) as e:
            read_preference_jsonl(str(f))
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_preference_jsonl(str(tmp_path / "nope.jsonl"))


def test_default_pairs_are_deterministic_shuffles_of_the_next_line():
    a = text_pairs("shakespeare", "train", 32, seed=0)
    assert a == text_pairs("shakespeare", "train", 32, seed=0) and len(a) == 32
    assert a != text_pairs("shakespeare", "train", 32, seed=1)
    for p in a:
        assert p.prompt.endswith("\n") and p.chosen != p.rejected
        assert sorted(p.chosen.split()) == sorted(p.rejected.split())
    held_out = {p.chosen for p in text_pairs("shakespeare", "validation", 64)}
    assert len(held_out) == 64


def test_config_errors():
    for kw, pattern in [
        (dict(method="dpo", gamma=0.5), "gamma is SimPO's"),
        (dict(method="ipo", label_smoothing=0.1), "label_smoothing applies to dpo and simpo"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(bf16_base=True), "LoRA only"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            PreferenceConfig(**kw)
    assert PreferenceConfig(method="simpo").beta_ == 2.0 and PreferenceConfig().beta_ == 0.1


# ----------------------------------------------------------------------------- training


def base_params(seed=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.device_get(nn.unbox(Transformer(CFG).init(jax.random.key(seed), tokens)["params"]))


def test_train_time_log_probs_equal_the_host_scorer():
    """The differentiable pair log-probs of the train step and the Scorer's (reference,
    evaluation) are the same numbers."""
    params = base_params()
    enc = [encode_pair(TOK, p, 16) for p in PAIRS]
    batch = jax.tree.map(jnp.asarray, make_pair_batch(enc, 16))
    got = pair_logps(CFG, params, batch)
    want = score_pairs(Scorer(CFG, params), enc, 16, batch_size=4)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)
    assert list(want.chosen_counts) == [len(w) for w in WORDS]


def _train_cfg(workdir, steps=12, lr=2e-2):
    return TrainConfig(steps=steps, learning_rate=lr, warmup_steps=0, weight_decay=0.0,
                       eval_every=6, save_every=6, log_every=6, mesh="data:2,fsdp:2,tensor:2",
                       workdir=str(workdir), progress_bar=False)  # fmt: skip


def test_dpo_lora_learns_the_preference_and_caches_the_reference(tmp_path):
    params = base_params()
    lora = L.LoraConfig(rank=4, alpha=8.0)
    pcfg = PreferenceConfig(method="dpo", beta=0.5, seq_len=16, batch_size=8, lora=lora)
    logs = []
    out = P.posttrain(CFG, params, TOK, PAIRS, _train_cfg(tmp_path), pcfg, eval_pairs=PAIRS,
                      log=logs.append)  # fmt: skip
    assert out["final"]["accuracy"] == 1.0 and out["final"]["reward_margin"] > 0.5
    assert out["history"][-1] < out["history"][0] < math.log(2) + 1e-3  # starts at log 2
    base, adapters = L.split_lora(jax.device_get(out["params"]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base), strict=True):
        assert np.array_equal(a, b)  # the frozen base is bitwise unchanged
    assert (tmp_path / "adapters").is_dir() and (tmp_path / P.REFERENCE_FILE).is_file()
    assert any("pairs scored" in x for x in logs)
    # a rerun resumes at the end and reads the cached reference instead of scoring again
    logs.clear()
    again = P.posttrain(CFG, params, TOK, PAIRS, _train_cfg(tmp_path), pcfg, eval_pairs=PAIRS,
                        log=logs.append)  # fmt: skip
    assert again["resumed_from"] == 12 and any("read from" in x for x in logs)
    assert again["final"] == out["final"]
    # other pairs on this workdir: the saved data position means nothing there, refused
    other = [PreferencePair(p.prompt, p.rejected, p.chosen) for p in PAIRS]
    with pytest.raises(CheckpointMismatch, match=r"another row stream: data\.source"):
        P.posttrain(CFG, params, TOK, other, _train_cfg(tmp_path, steps=14), pcfg,
                    log=logs.append)  # fmt: skip
    # other pairs: the cache is stale and scored again
    logs.clear()
    sets = {"train": [encode_pair(TOK, p, 16) for p in PAIRS[:4]], "eval": []}
    mesh = make_mesh("", devices=jax.devices()[:1])
    P.reference_logps(out["model_config"], out["state"].params, sets, pcfg, mesh, str(tmp_path),
                      logs.append)  # fmt: skip
    assert any("pairs scored" in x for x in logs)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 12


def test_simpo_full_training_needs_no_reference_and_batches_resume(tmp_path):
    pcfg = PreferenceConfig(method="simpo", seq_len=16, batch_size=8, save=False)
    out = P.posttrain(CFG, base_params(), TOK, PAIRS, _train_cfg(tmp_path, steps=8, lr=1e-2),
                      pcfg, eval_pairs=PAIRS)  # fmt: skip
    assert out["history"][-1] < out["history"][0] and out["final"]["accuracy"] >= 0.75
    assert not (tmp_path / P.REFERENCE_FILE).exists() and not (tmp_path / "checkpoints").exists()
    # the pair iterator: every pair once per epoch, and its state restarts it exactly
    enc = [encode_pair(TOK, p, 16) for p in PAIRS]
    it = PreferenceBatches(enc, PreferenceConfig(batch_size=3, seq_len=16), seed=0)
    first = [next(it)["chosen"]["inputs"] for _ in range(2)]
    seen = list(it.last_indices)
    state = it.get_state()
    nxt = next(it)
    it2 = PreferenceBatches(enc, PreferenceConfig(batch_size=3, seq_len=16), seed=0)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["chosen"]["inputs"], nxt["chosen"]["inputs"])
    assert len(first) == 2 and len(seen) == 3 and "ref_chosen" not in nxt


def test_grad_accum_splits_pairs_and_gives_the_same_step():
    mesh = make_mesh("", devices=jax.devices()[:1])
    pcfg = PreferenceConfig(method="dpo", beta=0.5, seq_len=16, batch_size=8)
    enc = [encode_pair(TOK, p, 16) for p in PAIRS]
    refs = (np.linspace(-30, -20, 8), np.linspace(-25, -35, 8))
    batch = jax.tree.map(jnp.asarray, make_pair_batch(enc, 16, refs=refs))
    out = []
    for n in (1, 4):
        tcfg = TrainConfig(steps=1, learning_rate=1e-2, warmup_steps=0, grad_accum=n)
        tx = make_optimizer(tcfg)
        state, _ = init_train_state(CFG, tx, mesh, params=base_params())
        new, m = jax.jit(
            lambda s, b, tc=tcfg, t=tx: train_step(
                s, b, jax.random.key(0), model_cfg=CFG, train_cfg=tc, pcfg=pcfg, tx=t
            )
        )(state, batch)
        out.append((jax.device_get(m), jax.device_get(new.params)))
    for m, p in out[1:]:
        for k in ("loss", "accuracy", "reward_margin", "grad_norm"):
            np.testing.assert_allclose(m[k], out[0][0][k], rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(out[0][1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_eight_devices_give_the_same_dpo_steps_as_one(tmp_path):
    """LoRA DPO (reference scored on the same mesh) on a 2x2x2 mesh of 8 CPU devices: the same
    losses, metrics and adapters as on one device."""
    pcfg = PreferenceConfig(method="dpo", beta=0.5, seq_len=16, batch_size=8,
                            lora=L.LoraConfig(rank=4, alpha=8.0))  # fmt: skip
    runs = []
    for name, spec, n in (("one", "", 1), ("eight", "data:2,fsdp:2,tensor:2", 8)):
        mesh = make_mesh(spec, devices=jax.devices()[:n])
        tcfg = _train_cfg(tmp_path / name, 3, 1e-3)
        runs.append(P.posttrain(CFG, base_params(), TOK, PAIRS, tcfg, pcfg, eval_pairs=PAIRS,
                                mesh=mesh, log=lambda s: None))  # fmt: skip
    one, eight = runs
    np.testing.assert_allclose(one["history"], eight["history"], rtol=1e-5, atol=1e-6)
    for k, v in one["final"].items():
        np.testing.assert_allclose(v, eight["final"][k], rtol=1e-5, atol=1e-6, err_msg=k)
    _, a1 = L.split_lora(jax.device_get(one["params"]))
    _, a8 = L.split_lora(jax.device_get(eight["params"]))
    for a, b in zip(jax.tree.leaves(a1), jax.tree.leaves(a8), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)
