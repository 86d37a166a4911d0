"""GRPO: advantages and the loss's value and gradient in closed form on toy values, prompts and
rewards, a short run on a tiny random model that raises a trivially learnable reward (LoRA:
the base bitwise frozen; a rerun resumes at the end), and one step on 8 (fake CPU) devices
equal to the step on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax import adapters as L
from lm_jax.align.rewards import make_reward
from lm_jax.configs import ConfigError, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.data.chat_template import resolve_template
from lm_jax.losses_rl import group_advantages, grpo_loss, k3_kl
from lm_jax.nn import Transformer
from lm_jax.sharding import make_mesh
from lm_jax.train import grpo as GR
from lm_jax.train.engine import read_history
from lm_jax.train.grpo_data import (
    GRPOConfig,
    Prompt,
    arith_exact,
    arithmetic_problems,
    read_prompts_jsonl,
    step_indices,
)
from lm_jax.train.tuning import prepare_model

TOK = ByteTokenizer()
CFG = llama_style(vocab_size=257, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_len=64, initializer_range=0.2)  # fmt: skip
PROMPTS = [Prompt(f"{w}: ") for w in ["apple", "storm", "quiet", "ember"]]


def ascii_share(prompts, completions, answers):
    """A trivially learnable reward: the share of ASCII characters in the completion."""
    return np.array([np.mean([ord(ch) < 128 for ch in c]) if c else 0.0 for c in completions])


def base_params(seed=0):
    import flax.linen as nn

    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(Transformer(CFG).init(jax.random.key(seed), tokens)["params"])


# ----------------------------------------------------------------------------- maths


def test_group_advantages_closed_form():
    r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0], np.float32)
    adv, m = group_advantages(r, 4, "group")
    std = np.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # Bessel-corrected: 0.5
    centred = np.array([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    want = centred / np.array([std + 1e-4] * 4 + [1e-4] * 4)
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-6)
    assert float(m["frac_reward_zero_std"]) == 0.5 and float(m["reward"]) == pytest.approx(1.125)
    adv, _ = group_advantages(r, 4, "none")
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], atol=1e-7)
    adv, _ = group_advantages(r, 4, "batch")
    np.testing.assert_allclose(adv, (r - np.repeat([0.25, 2.0], 4)) / (np.std(r, ddof=1) + 1e-4),
                               rtol=1e-6)  # fmt: skip
    with pytest.raises(ConfigError, match="groups of 3"):
        group_advantages(r, 3)


def test_loss_value_and_gradient_closed_form():
    B, T = 4, 5
    rng = np.random.default_rng(0)
    logps = jnp.asarray(rng.normal(-2, 0.5, (B, T)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]],
                       jnp.float32)  # fmt: skip
    adv = jnp.asarray([1.0, -0.5, 2.0, -1.0])
    n = mask.sum(1)
    # on-policy (ratio 1): the loss is -mean_b A_b and its gradient -A_b m / (n_b B)
    for lt, want_g in [("grpo", -adv[:, None] * mask / (n[:, None] * B)),
                       ("bnpo", -adv[:, None] * mask / mask.sum()),
                       ("dr_grpo", -adv[:, None] * mask / (B * 7))]:  # fmt: skip
        f = lambda lp, lt=lt: grpo_loss(lp, adv, mask, loss_type=lt, max_completion_length=7)[0]  # noqa: E731
        g = jax.grad(f)(logps)
        np.testing.assert_allclose(g, want_g, rtol=1e-6, atol=1e-7)
    loss, _ = grpo_loss(logps, adv, mask)
    assert float(loss) == pytest.approx(-float(adv.mean()), abs=1e-6)
    # off-policy: where the ratio left [1 - eps, 1 + eps] on the binding side, no gradient
    old = logps - jnp.log(1.5)  # ratio 1.5 everywhere
    f = lambda lp: grpo_loss(lp, adv, mask, old_logps=old, epsilon_low=0.2)  # noqa: E731
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(logps)
    clipped = (adv > 0)[:, None] & (mask > 0)
    assert np.all(np.asarray(g)[np.asarray(clipped)] == 0)
    assert np.all(np.asarray(g)[np.asarray((adv < 0)[:, None] & (mask > 0))] != 0)
    per_seq = np.where(np.asarray(adv) > 0, -1.2 * np.asarray(adv), -1.5 * np.asarray(adv))
    assert float(loss) == pytest.approx(per_seq.mean(), rel=1e-6)
    want_clip = float((clipped * mask).sum() / mask.sum())
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(want_clip)
    # the k3 KL: exp(d) - d - 1 with d = ref - logp; >= 0, 0 at ref = logp
    ref = logps + 0.3
    np.testing.assert_allclose(k3_kl(logps, ref), np.exp(0.3) - 0.3 - 1, rtol=1e-5)
    _, m = grpo_loss(logps, adv, mask, ref_logps=ref, beta=0.1)
    assert float(m["kl"]) == pytest.approx(np.exp(0.3) - 1.3, rel=1e-4)
    with pytest.raises(ConfigError, match="reference"):
        grpo_loss(logps, adv, mask, beta=0.1)
    with pytest.raises(ConfigError, match="loss_type"):
        grpo_loss(logps, adv, mask, loss_type="ppo")


# ----------------------------------------------------------------------------- data, rewards


def test_prompts_and_rewards(tmp_path):
    probs = arithmetic_problems(300, seed=1)
    assert len({p.prompt for p in probs}) == 300
    for p in probs[:50]:
        q = p.prompt.split("What is ")[1].rstrip("?\nA:").split()
        a, op, b = int(q[0]), q[1], int(q[2])
        assert int(p.answer) == (a + b if op == "plus" else a - b) and a < 100 and b < 100
    held = arithmetic_problems(50, seed=2, exclude=probs)
    assert not {p.prompt for p in held} & {p.prompt for p in probs}
    seen = [i for s in range(6) for i in step_indices(10, 5, 0, s)]  # 3 epochs of 10
    for e in range(3):
        assert sorted(seen[10 * e : 10 * (e + 1)]) == list(range(10))
    assert step_indices(10, 5, 0, 3) == step_indices(10, 5, 0, 3)
    r = arith_exact(["", "", "", ""], [" 12 apples", "-3", "no", " 1 2"], ["12", "-3", "1", "2"])
    np.testing.assert_array_equal(r, [1, 1, 0, 0])
    last = make_reward("arith_last", TOK)  # the first non-empty line's last integer
    texts = [" 1 + 3 = 4", "\n6 + 9 = 15\nso 14", "7 apples", "To add 6 and 9, we", "4\n5"]
    np.testing.assert_array_equal(last([""] * 5, texts, ["4", "15", "7", "15", "5"]),
                                  [1, 1, 1, 0, 0])  # fmt: skip
    np.testing.assert_array_equal(arith_exact([""] * 5, texts, ["4", "15", "7", "15", "5"]),
                                  [0, 0, 1, 0, 0])  # fmt: skip
    with pytest.raises(ConfigError, match="arith_last needs an 'answer'"):
        last([""], ["4"], [None])
    # a chat prompt: one user turn rendered for the reply, tokenized without special tokens
    tmpl = resolve_template("chatml", TOK)
    ids = GR.encode_prompt(TOK, "What is 3 plus 4?", 80, tmpl)
    want = "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    assert TOK.decode(ids) == want and ids == list(TOK.encode(want))
    with pytest.raises(ConfigError, match="more than prompt_len 16: raise --posttrain.prompt_len"):
        GR.encode_prompt(TOK, "What is 3 plus 4?", 16, tmpl)
    with pytest.raises(ConfigError, match="unknown chat template 'zephyr'"):
        GRPOConfig(chat_template="zephyr")
    you = make_reward("wholeword:you", TOK)
    got = you([""] * 3, ["thank you", "youth", "you!"], [None] * 3)
    np.testing.assert_array_equal(got, [1, 0, 1])
    with pytest.raises(ConfigError, match="unknown reward"):
        GRPOConfig(reward="bleu")
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        GRPOConfig(num_generations=1)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "answer": 1}\n{"answer": 2}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: missing key 'prompt'"):
        read_prompts_jsonl(str(bad))


# ----------------------------------------------------------------------------- training


def _train_cfg(workdir, steps=14, lr=3e-2):
    return TrainConfig(steps=steps, learning_rate=lr, warmup_steps=0, weight_decay=0.0,
                       save_every=7, eval_every=0, log_every=1, workdir=str(workdir),
                       progress_bar=False, async_checkpointing=False)  # fmt: skip


def test_lora_grpo_raises_a_learnable_reward_and_resumes(tmp_path):
    params = base_params()
    gcfg = GRPOConfig(num_generations=8, prompts_per_step=2, num_iterations=2, beta=0.02,
                      max_new_tokens=8, prompt_len=8,
                      lora=L.LoraConfig(rank=8, alpha=32.0))  # fmt: skip
    mesh = make_mesh("", devices=jax.devices()[:1])
    logs = []
    out = GR.posttrain(CFG, params, TOK, PROMPTS, ascii_share, _train_cfg(tmp_path, lr=0.1), gcfg,
                       eval_prompts=PROMPTS, mesh=mesh, log=logs.append)  # fmt: skip
    hist = [r for r in read_history(str(tmp_path)) if "train/reward" in r]
    first = np.mean([r["train/reward"] for r in hist[:3]])
    last = np.mean([r["train/reward"] for r in hist[-3:]])
    assert last > first + 0.1, (first, last)
    for k in ("kl", "clip_ratio", "sample_time_share", "sampler_tokens_per_s"):
        assert f"train/{k}" in hist[-1], k
    assert 0 < hist[-1]["train/sample_time_share"] < 1
    assert out["final"]["reward"] >= 0 and 0 < out["stats"]["sample_time_share"] < 1
    base, _ = L.split_lora(jax.device_get(out["params"]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base), strict=True):
        assert np.array_equal(a, b)  # the reference (the frozen base) is bitwise unchanged
    again = GR.posttrain(CFG, params, TOK, PROMPTS, ascii_share, _train_cfg(tmp_path, lr=0.1),
                         gcfg,
                         eval_prompts=PROMPTS, mesh=mesh, log=logs.append)  # fmt: skip
    assert again["resumed_from"] == 14 and again["final"] == out["final"]


def _one_step(mesh, gcfg, params):
    cfg, p, trainable = prepare_model(CFG, params, gcfg, 0)
    # a small learning rate: Adam normalises near-zero gradients, whose last-bit differences
    # between reduction orders would otherwise become visible update differences
    tcfg = _train_cfg("/tmp/unused", lr=1e-3)
    task = GR.GRPOTask(cfg, p, trainable, TOK, PROMPTS, ascii_share, tcfg, gcfg, mesh=mesh)
    state = task.init_state()
    state, m = task.train_step(state, 0)
    state, m2 = task.train_step(state, 1)
    return jax.device_get(state.params), m, m2, task.last["sample_hash"]


def test_eight_devices_give_the_same_step_as_one():
    assert len(jax.devices()) >= 8
    params = base_params(1)
    gcfg = GRPOConfig(num_generations=4, prompts_per_step=4, num_iterations=2, beta=0.05,
                      max_new_tokens=6, prompt_len=8)  # full training: a kept reference copy
    one = _one_step(make_mesh("", devices=jax.devices()[:1]), gcfg, params)
    eight = _one_step(make_mesh("data:8", devices=jax.devices()[:8]), gcfg, params)
    assert one[3] == eight[3]  # the same samples (the sampler's RNG does not depend on the mesh)
    for k in ("loss", "kl", "reward", "clip_ratio", "grad_norm"):
        for a, b in ((one[1], eight[1]), (one[2], eight[2])):
            np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(eight[0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


def test_a_resume_with_another_chat_template_is_refused():
    """The data fingerprint covers the prompts as encoded (template applied, truncated), so a
    resume that would sample from other prompt rows fails with the field and the fix."""
    from lm_jax.errors import CheckpointMismatch
    from lm_jax.resume_config import check_resume_config

    cfg, p, trainable = prepare_model(CFG, base_params(), GRPOConfig(prompt_len=60), 0)
    metas = []
    for template in (None, "chatml", None):
        gcfg = GRPOConfig(num_generations=4, prompts_per_step=4, max_new_tokens=4, prompt_len=60,
                          chat_template=template)  # fmt: skip
        one = make_mesh("", devices=jax.devices()[:1])
        task = GR.GRPOTask(cfg, p, trainable, TOK, PROMPTS, ascii_share,
                           _train_cfg("/tmp/unused"), gcfg, mesh=one)  # fmt: skip
        metas.append(task.meta())
    assert check_resume_config(7, "wd", metas[0], metas[2]) == []
    with pytest.raises(CheckpointMismatch, match=r"another row stream: data\.source"):
        check_resume_config(7, "wd", metas[0], metas[1])
