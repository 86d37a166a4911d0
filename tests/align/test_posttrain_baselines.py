"""DPO and GRPO beside DPG on one target (`lm_jax.align.posttrain_baselines`): on a tiny random
byte-level model with a feature it hits often, both raise E_pi[phi] above the base's under the
same evaluation DPG gets (KL(pi||a) > 0 once trained, KL(p||pi) and diversity reported), the
untrained policy reads KL(pi||a) = 0, and a rerun resumes from the workdir to the same row."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.align import parse_constraint
from lm_jax.align.loop import estimate_target, evaluate_policy, scorer
from lm_jax.align.policies import make_lm_policy
from lm_jax.align.posttrain_baselines import EVAL_FILE, feature_reward_spec, run_baseline
from lm_jax.align.samplers import SamplerConfig
from lm_jax.configs import ConfigError, llama_style
from lm_jax.configs.lora import LoraConfig
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.nn import Transformer

TOK = ByteTokenizer()
CFG = llama_style(vocab_size=257, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_len=64, initializer_range=0.2)  # fmt: skip
SPEC = "regex:[aeiou]"  # any vowel in the sample: the random model hits it a third of the time


def _setup():
    params = nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    params = params["params"]
    scfg = SamplerConfig(max_new_tokens=24, prompt=tuple(TOK.encode("\n")))
    policy, trainable, frozen = make_lm_policy(CFG, params, scfg, LoraConfig(rank=4, alpha=8.0))
    cons = [parse_constraint(SPEC, TOK)]
    score = scorer(policy, cons)
    *target, ref = estimate_target(policy, frozen, cons, jax.random.key(1), 512, 64, score,
                                   return_samples=True)  # fmt: skip
    return params, policy, trainable, frozen, score, target, ref


def test_feature_reward_spec():
    assert feature_reward_spec("wholeword:you=0.5") == "wholeword:you"
    assert feature_reward_spec("wholeword:you") == "wholeword:you"
    assert feature_reward_spec("regex:a=b") == "regex:a=b"  # "=" inside the pattern


@pytest.mark.slow
def test_dpo_and_grpo_raise_phi_under_the_dpg_evaluation(tmp_path):
    params, policy, trainable, frozen, score, target, ref = _setup()
    phi_a = float(np.mean(ref["phi"][:, 0]))
    assert 0.1 < phi_a < 0.9
    untrained = evaluate_policy(policy, trainable, frozen, score, jax.random.key(5), 128, 64,
                                ebm=target[0], reference=ref, tokenizer=TOK)  # fmt: skip
    assert abs(untrained["eval/kl_pi_a"]) < 1e-4  # B = 0: pi = a
    kw = dict(cfg=CFG, params=params, tokenizer=TOK, policy=policy, frozen=frozen, score=score,
              target=target, reference=ref, constraint_specs=[SPEC], prompt="\n", steps=24,
              batch_size=32, learning_rate=1e-2, seed=0, eval_samples=128,
              key=jax.random.key(2), log=lambda s: None)  # fmt: skip
    rows = {}
    for m in ("dpo", "grpo"):
        rows[m] = run_baseline(m, workdir=str(tmp_path / m), **kw)
        r = rows[m]
        assert r["eval/phi_pi"][0] > phi_a + 0.1, (m, r["eval/phi_pi"], phi_a)
        assert r["eval/kl_pi_a"] > 0.01 and np.isfinite(r["eval/kl_p_pi"])
        assert 0 < r["eval/distinct_2"] <= 1 and "eval/self_bleu" in r
    assert rows["dpo"]["pairs"] > 0 and rows["dpo"]["samples"] == rows["grpo"]["samples"] == 768
    again = run_baseline("grpo", workdir=str(tmp_path / "grpo"), **kw)  # resumes at the end
    assert again == rows["grpo"]
    # in segments of 8 steps, scored after each: the same final policy as one run of 24
    for m in ("dpo", "grpo"):
        wd = tmp_path / f"{m}_segments"
        seg = run_baseline(m, workdir=str(wd), eval_every=8, initial=trainable, **kw)
        assert seg == rows[m], m
        evals = [json.loads(line) for line in (wd / EVAL_FILE).read_text().splitlines()]
        assert [r["step"] for r in evals] == [0, 8, 16, 24]
        assert abs(evals[0]["eval/kl_pi_a"]) < 1e-4  # step 0: the base
    with pytest.raises(ConfigError, match="one --constraint"):
        run_baseline("dpo", workdir=str(tmp_path / "x"), **{**kw, "constraint_specs": [SPEC] * 2})
