"""The LM path: LoRA policy on a frozen random backbone, generator log q = scorer log pi,
data-parallel DPG steps through the host loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm_jax.align import Constraint, TunerConfig, token_sequences_feature
from lm_jax.align.loop import estimate_target, train
from lm_jax.align.policies import make_lm_policy
from lm_jax.align.samplers import SamplerConfig
from lm_jax.configs import llama_style
from lm_jax.configs.lora import LoraConfig
from lm_jax.nn import Transformer
from lm_jax.sharding import make_mesh

CFG = llama_style(vocab_size=16, d_model=32, num_layers=2, num_heads=2, max_len=64)


def _setup():
    params = Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    scfg = SamplerConfig(max_new_tokens=12, stop_tokens=(1,), prompt=(2,))
    return make_lm_policy(CFG, params, scfg, lora=LoraConfig(rank=2, alpha=4.0))


def test_lora_policy_starts_at_base_and_scores_like_the_generator():
    policy, adapters, frozen = _setup()
    assert all("lora" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters))
    s = policy.sample(adapters, frozen, jax.random.key(1), 8)
    assert s.tokens.shape == (8, 13) and float(s.mask[:, 0].max()) == 0.0
    log_pi = policy.logprob_fn(adapters, frozen, s.tokens, s.mask)
    log_a = policy.base_logprob(frozen, s.tokens, s.mask)
    np.testing.assert_allclose(log_pi, s.log_q, rtol=1e-4, atol=1e-4)  # KV cache == full pass
    np.testing.assert_allclose(log_pi, log_a, rtol=1e-6)  # B = 0: adapters off == on


@pytest.mark.slow
def test_dpg_on_lm_raises_phi_sharded_8():
    policy, adapters, frozen = _setup()
    cons = [Constraint(token_sequences_feature("tok5", [(5,)]))]
    ebm, info = estimate_target(policy, frozen, cons, jax.random.key(2), 256, 64)
    assert 0.0 < info["phi_a"][0] < 1.0 and np.isfinite(info["log_z"])
    mesh = make_mesh("data:8")
    tx = optax.adam(3e-2)
    with jax.set_mesh(mesh):
        state, hist = train(
            policy,
            adapters,
            frozen,
            cons,
            TunerConfig("dpg"),
            tx,
            steps=8,
            batch_size=64,
            key=jax.random.key(3),
            target=(ebm, info),
            mesh=mesh,
            log=lambda _: None,
        )
    phi = [h["phi_pi"][0] for h in hist[:-1]]
    assert np.all(np.isfinite([h["loss"] for h in hist[:-1]]))
    assert np.mean(phi[-3:]) > np.mean(phi[:3]), phi
    assert int(state.skipped) == 0
