"""Supervised fine-tuning: completion-only loss, LoRA (frozen base, adapter checkpoints, peft
export), full fine-tuning (lm_jax checkpoint), label scoring, and the binary's start-up errors."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax import adapters as L
from lm_jax.configs import ConfigError, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.nn import Transformer
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train import finetune as F
from lm_jax.train.state import init_train_state
from lm_jax.train.step import jit_train_step

REPO = pathlib.Path(__file__).resolve().parents[2]
CFG = llama_style(
    vocab_size=257,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    max_len=64,
    initializer_range=0.2,  # fan-in scale: the random "pretrained" base has leverage for LoRA
)
TOK = ByteTokenizer()
WORDS = ["apple", "storm", "quiet", "ember", "lunar", "frost", "maple", "cider"]
LABELS = (" Y", " N")  # two bytes each: the general (multi-token) scoring path
EXAMPLES = [F.Example(f"is {w} red?", LABELS[i % 2]) for i, w in enumerate(WORDS)]


def base_params(seed=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.device_get(nn.unbox(Transformer(CFG).init(jax.random.key(seed), tokens)["params"]))


def reference_nll(cfg, params, examples) -> float:
    """Mean -log p(completion token | everything before it), one unpadded example at a time."""
    total = count = 0.0
    for ex in examples:
        p, c = TOK.encode(ex.prompt), TOK.encode(ex.completion)
        ids = jnp.asarray([p + c], jnp.int32)
        logp = jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, ids[:, :-1]), -1)
        for j in range(len(c)):  # target ids[len(p) + j] is predicted at position len(p) + j - 1
            total -= float(logp[0, len(p) + j - 1, c[j]])
            count += 1
    return total / count


def test_batch_layout_right_padding_and_completion_mask():
    enc = [F.encode_example(TOK, F.Example("abcdef", "XY"), seq_len=6)]  # prompt cut to 5
    enc.append(F.encode_example(TOK, F.Example("ab", "Z"), seq_len=6))
    assert enc[0][1] == 5 and list(enc[0][0][:2]) == TOK.encode("bc")
    b = F.make_batch(enc, seq_len=6, rows=3)
    assert b["inputs"].shape == (3, 6)
    np.testing.assert_array_equal(b["segment_ids"], [[1] * 6, [1, 1, 0, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["positions"][1], [0, 1, 0, 0, 0, 0])
    # loss only where the target is a completion token
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(b["loss_mask"][1], [0, 1, 0, 0, 0, 0])
    assert b["targets"][0, 4] == ord("X") and b["targets"][1, 1] == ord("Z")
    with pytest.raises(ConfigError, match="completion"):
        F.encode_example(TOK, F.Example("a", "x" * 10), seq_len=6)


def test_loss_counts_only_completion_tokens():
    """The train step's loss is the reference completion NLL; prompt *targets* (and padding)
    can be anything without changing loss or gradients; a completion target changes both."""
    mesh = make_mesh("", devices=jax.devices()[:1])
    tcfg = TrainConfig(steps=1, learning_rate=1e-3, warmup_steps=0)
    tx = make_optimizer(tcfg)
    params = base_params()
    enc = [F.encode_example(TOK, e, 32) for e in EXAMPLES]
    batch = F.make_batch(enc, 32)
    scrambled = dict(batch)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, CFG.vocab_size, batch["targets"].shape).astype(np.int32)
    scrambled["targets"] = np.where(batch["loss_mask"] > 0, batch["targets"], noise)
    assert (scrambled["targets"] != batch["targets"]).sum() > 50
    changed = dict(batch)
    changed["targets"] = batch["targets"].copy()
    b, t = np.argwhere(batch["loss_mask"] > 0)[0]
    changed["targets"][b, t] = (batch["targets"][b, t] + 1) % CFG.vocab_size

    bsh = batch_sharding(mesh, 2, 8)
    fn = None

    def step(bt):
        nonlocal fn
        state, sh = init_train_state(CFG, tx, mesh, params=params)
        fn = fn or jit_train_step(CFG, tcfg, tx, sh, bsh)
        new, m = fn(state, {k: jax.device_put(v, bsh) for k, v in bt.items()}, jax.random.key(0))
        return float(m["loss"]), jax.device_get(new.params)

    loss, p1 = step(batch)
    np.testing.assert_allclose(loss, reference_nll(CFG, params, EXAMPLES), rtol=1e-5)
    loss_s, p_s = step(scrambled)
    assert loss_s == loss
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p_s)))
    loss_c, p_c = step(changed)
    assert loss_c != loss
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p_c)))


def _train_cfg(workdir, steps=30, lr=1e-2, mesh="data:2,fsdp:2,tensor:2"):
    return TrainConfig(
        steps=steps,
        learning_rate=lr,
        warmup_steps=2,
        weight_decay=0.0,
        eval_every=0,
        save_every=0,
        log_every=10,
        mesh=mesh,
        workdir=str(workdir),
    )


def test_lora_freezes_base_lowers_loss_and_saves_adapters_only(tmp_path):
    params = base_params()
    lora = L.LoraConfig(rank=4, alpha=8.0)
    ft = F.FinetuneConfig(seq_len=32, batch_size=8, lora=lora, length_multiple=0, export_peft=True)
    out = F.finetune(
        CFG, params, TOK, EXAMPLES, _train_cfg(tmp_path), ft, eval_examples=EXAMPLES, log=print
    )
    base1, adapters1 = L.split_lora(jax.device_get(out["params"]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base1), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)  # base bitwise unchanged
    assert any(np.any(x) for x in jax.tree.leaves(adapters1))  # lora_b moved off zero
    before = reference_nll(CFG, params, EXAMPLES)
    after = reference_nll(out["model_config"], out["params"], EXAMPLES)
    assert after < 0.5 * before
    np.testing.assert_allclose(out["final"]["completion_loss"], after, rtol=1e-4)

    stats, adapter_bytes = out["stats"], L.tree_bytes(adapters1)
    assert stats["trainable_params"] == sum(x.size for x in jax.tree.leaves(adapters1))
    # Adam's mu and nu for the adapters only (+ scalar counts): no state for the frozen base
    assert 2 * adapter_bytes <= stats["optimizer_state_bytes"] < 2 * adapter_bytes + 64

    adir = tmp_path / "adapters"
    files = [p for p in adir.rglob("*") if p.is_file()]
    on_disk = sum(p.stat().st_size for p in files)
    assert on_disk < 0.5 * L.tree_bytes(base1)  # tiny model: adapters are 13% of it
    meta = json.loads((adir / L.ADAPTER_META).read_text())
    assert meta["bytes"] == adapter_bytes and len(meta["shapes"]) == len(jax.tree.leaves(adapters1))
    restored, rcfg = L.load_adapters(str(adir))
    assert jax.tree.structure(restored) == jax.tree.structure(adapters1)
    assert rcfg == lora
    for a, b in zip(jax.tree.leaves(adapters1), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    tokens = jnp.asarray([TOK.encode("is apple red? Y")], jnp.int32)
    model = Transformer(CFG.replace(lora=rcfg))
    np.testing.assert_array_equal(
        model.apply({"params": L.combine(params, restored)}, tokens),
        model.apply({"params": jax.device_get(out["params"])}, tokens),
    )
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "metrics.jsonl").is_file()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    params = base_params()
    ft = F.FinetuneConfig(seq_len=32, batch_size=8, length_multiple=0)
    one = make_mesh("", devices=jax.devices()[:1])
    out = F.finetune(CFG, params, TOK, EXAMPLES, _train_cfg(workdir, 5, 3e-3), ft, mesh=one)
    return workdir, params, out


def test_full_finetuning_changes_base_and_checkpoint_loads(full_run):
    from lm_jax.checkpoint import load_model

    workdir, params, out = full_run
    final = jax.device_get(out["params"])
    assert all(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final))
    )
    assert out["stats"]["trainable_pct"] == 100.0
    cfg, loaded, tok = load_model(str(workdir))
    assert cfg == CFG and tok.vocab_size == TOK.vocab_size
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_label_scoring_fast_path_matches_option_likelihoods():
    """Single-token labels take one forward per prompt; it agrees with scoring each option."""
    classification = pytest.importorskip("lm_jax.eval.classification")
    params = base_params()
    prompts = [e.prompt for e in EXAMPLES]
    for labels in (("Y", "N"), LABELS):  # single-token (fast path) and two-token labels
        got = F.label_logliks(CFG, params, TOK, prompts, labels, seq_len=32, batch_size=8)
        want, _ = classification.option_loglikelihoods(CFG, params, TOK, prompts, labels)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    data = F.ClassificationSet(tuple(prompts), ("Y", "N"), np.arange(8) % 2)
    rep = F.classify(CFG, params, TOK, data, seq_len=32, batch_size=8)
    assert 0.0 <= rep["accuracy"] <= 1.0 and rep["n"] == 8


def test_startup_errors():
    with pytest.raises(ConfigError, match="unknown task"):
        F.check_task("imdb", "")
    assert F.lora_config(0, 16.0) is None
    with pytest.raises(ConfigError, match="positive integer"):
        F.lora_config(-1, 16.0)
    with pytest.raises(ConfigError, match="LoRA only"):
        F.FinetuneConfig(bf16_base=True)


def test_binary_rejects_bad_target_pattern_before_compiling(full_run, tmp_path):
    workdir, _, _ = full_run
    out_dir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "finetune.py"),
            f"--checkpoint={workdir}",
            "--finetune.lora.targets=attn/q_proj,attn/nope_proj",
            f"--train.workdir={out_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'attn/nope_proj' matches no kernel" in r.stderr and "Traceback" not in r.stderr
    assert not out_dir.exists()  # failed before training set anything up
