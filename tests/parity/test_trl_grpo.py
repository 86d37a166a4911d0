"""GRPO (`grpo`, `dr_grpo`, `bnpo` loss types) equals TRL 1.16's `GRPOTrainer` on a fixed batch.

One random tiny HF LlamaForCausalLM, converted with `lm_jax.convert.from_hf`, is the policy of a
real (offline) `trl.GRPOTrainer`. A fixed batch of G completions per prompt, their rewards, old
and reference per-token log-probs goes through TRL's `_compute_loss(model, inputs)` (its fused
temperature-scaled head, the clipped ratio, the k3 KL, the loss-type normalisation, the clip and
KL metrics) and through lm_jax's `lm_jax.train.grpo.batch_loss` (the function the GRPO update
differentiates). Loss, metrics and the gradient of several parameter tensors agree to 1e-5 in
float32. Advantages: TRL computes them inline in `_generate_and_score_completions` (with a
generation pass, not callable on given rewards), so the test re-derives them with TRL's own
`nanstd` exactly as trl/trainer/grpo_trainer.py (1.16.0) lines 2760-2788 do ("sum_then_normalize":
group mean, group / batch std, `/ (std + 1e-4)` unless scale_rewards == "none") and compares with
`lm_jax.losses_rl.group_advantages`.

Prompts all have the same length: TRL left-pads prompts and HF Llama then shifts the positions
of a padded row (no position ids are passed), which lm_jax's right-padded rows do not do.
Completions have different lengths (right-padded, masked)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lm_jax.convert import from_hf  # noqa: E402
from lm_jax.losses_rl import group_advantages  # noqa: E402
from lm_jax.train.grpo import batch_loss, completion_rows  # noqa: E402
from lm_jax.train.grpo_data import GRPOConfig  # noqa: E402
from tests.parity.test_trl_preference import GRADS, hf_llama, word_tokenizer  # noqa: E402

TOL = 1e-5
V = 101
G, N_PROMPTS, PROMPT_LEN, C = 4, 2, 5, 6  # B = 8 completions of up to C tokens


def fixed_batch(seed=0):
    """Prompts [P, L], completions (ragged, < C tokens or C with no EOS), rewards [B]."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(4, V, (N_PROMPTS, PROMPT_LEN))
    comps = [rng.integers(4, V, rng.integers(1, C + 1)).tolist() for _ in range(G * N_PROMPTS)]
    rewards = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 2.0], np.float32)
    return prompts, comps, rewards


def trl_advantages(rewards, scale_rewards):
    """TRL 1.16 grpo_trainer.py 2763-2788 (multi_objective_aggregation="sum_then_normalize",
    one reward function of weight 1), with TRL's own `nanstd`."""
    from trl.trainer.utils import nanstd

    r = torch.tensor(rewards)
    mean = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(r).expand_as(r)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(scale):
    _, _, rewards = fixed_batch()
    got, m = group_advantages(jnp.asarray(rewards), G, scale)
    np.testing.assert_allclose(np.asarray(got), trl_advantages(rewards, scale), rtol=0, atol=TOL)
    assert float(m["frac_reward_zero_std"]) == 0.0
    # a group with equal rewards: advantages 0 and counted as zero-std
    flat = np.array([1.0] * 4 + [0, 1, 0, 1], np.float32)
    got, m = group_advantages(jnp.asarray(flat), G, scale)
    np.testing.assert_allclose(np.asarray(got), trl_advantages(flat, scale), rtol=0, atol=TOL)


def make_trainer(policy, tmp_path, *, loss_type, beta, eps, eps_high, temperature, kl_corr):
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), num_generations=G, per_device_train_batch_size=G * 2,
        max_completion_length=C, beta=0.0, epsilon=eps, epsilon_high=eps_high,
        loss_type=loss_type, temperature=temperature, report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, logging_steps=1, use_bias_correction_kl=kl_corr,
    )  # fmt: skip
    ds = datasets.Dataset.from_dict({"prompt": ["t5 t6"] * 8})
    zero = lambda completions, **k: [0.0] * len(completions)  # noqa: E731 (never called)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=zero, args=args, train_dataset=ds,
                              processing_class=word_tokenizer())  # fmt: skip
    # beta > 0 at construction makes TRL load a reference model by hub id; _compute_loss reads
    # only `self.beta` and the given ref_per_token_logps, so it is set afterwards
    trainer.beta = beta
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def trl_inputs(trainer, prompts, comps, adv, seed=1):
    """TRL's inputs dict, with old / reference log-probs = the policy's own plus noise."""
    B = len(comps)
    p_ids = torch.tensor(np.repeat(prompts, G, axis=0), dtype=torch.long)
    c_ids = torch.full((B, C), 2, dtype=torch.long)  # pad id 2
    c_mask = torch.zeros((B, C), dtype=torch.long)
    for i, c in enumerate(comps):
        c_ids[i, : len(c)] = torch.tensor(c)
        c_mask[i, : len(c)] = 1
    with torch.no_grad():
        ids = torch.cat([p_ids, c_ids], 1)
        att = torch.cat([torch.ones_like(p_ids), c_mask], 1)
        cur, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, C)
    g = torch.Generator().manual_seed(seed)
    old = cur + 0.3 * torch.randn(cur.shape, generator=g)
    ref = cur + 0.5 * torch.randn(cur.shape, generator=g)
    return {"prompt_ids": p_ids, "prompt_mask": torch.ones_like(p_ids), "completion_ids": c_ids,
            "completion_mask": c_mask, "advantages": torch.tensor(adv),
            "old_per_token_logps": old, "ref_per_token_logps": ref}  # fmt: skip


def to_rows(x, comps):
    """[B, C] completion-position values -> [B, T] row layout (target t = PROMPT_LEN-1+j)."""
    T = PROMPT_LEN + C - 1
    out = np.zeros((len(comps), T), np.float32)
    out[:, PROMPT_LEN - 1 :] = x
    return out


CASES = [  # (loss_type, scale_rewards, beta, epsilon, epsilon_high, temperature, kl corr.)
    ("grpo", "group", 0.04, 0.2, 0.2, 1.0, True),
    ("grpo", "group", 0.1, 0.2, 0.2, 1.0, False),
    ("grpo", "batch", 0.0, 0.2, 0.28, 0.7, True),
    ("dr_grpo", "none", 0.04, 0.2, 0.2, 1.0, True),
    ("dr_grpo", "none", 0.1, 0.1, 0.3, 0.7, False),
    ("bnpo", "group", 0.04, 0.2, 0.2, 1.0, True),
]


@pytest.mark.parametrize("loss_type, scale, beta, eps, eps_high, temp, kl_corr", CASES,
                         ids=[f"{c[0]}_{c[1]}_beta{c[2]}_t{c[5]}_{'w' if c[6] else 'k3'}"
                              for c in CASES])  # fmt: skip
def test_loss_metrics_and_gradients_match_trl(loss_type, scale, beta, eps, eps_high, temp,
                                              kl_corr, tmp_path):  # fmt: skip
    prompts, comps, rewards = fixed_batch()
    adv = trl_advantages(rewards, scale)
    policy = hf_llama(0)
    cfg, params = from_hf(policy)
    trainer = make_trainer(policy, tmp_path, loss_type=loss_type, beta=beta, eps=eps,
                           eps_high=eps_high, temperature=temp, kl_corr=kl_corr)  # fmt: skip
    inputs = trl_inputs(trainer, prompts, comps, adv)
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    want_m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    want_g = {n: p.grad.detach().numpy().astype(np.float64)
              for n, p in trainer.model.named_parameters()}  # fmt: skip

    gcfg = GRPOConfig(num_generations=G, prompts_per_step=N_PROMPTS, beta=beta, epsilon=eps,
                      epsilon_high=eps_high, loss_type=loss_type, scale_rewards=scale,
                      max_new_tokens=C, temperature=temp, prompt_len=PROMPT_LEN,
                      kl_bias_correction=kl_corr)  # fmt: skip
    got_adv, _ = group_advantages(jnp.asarray(rewards), G, gcfg.scale_rewards_)
    np.testing.assert_allclose(np.asarray(got_adv), adv, rtol=0, atol=TOL)
    batch = completion_rows(np.repeat(prompts, G, axis=0).tolist(), comps, PROMPT_LEN + C - 1)
    batch["advantages"] = np.asarray(got_adv)
    batch["old_logps"] = to_rows(inputs["old_per_token_logps"].numpy(), comps)
    if beta:
        batch["ref_logps"] = to_rows(inputs["ref_per_token_logps"].numpy(), comps)
    fn = jax.value_and_grad(batch_loss, has_aux=True)
    (got, m), grads = fn(params, batch, jax.random.key(0), model_cfg=cfg, gcfg=gcfg)
    m, grads = jax.device_get((m, grads))

    want = float(loss.item())
    assert abs(float(got) - want) <= TOL * max(1.0, abs(want)), (float(got), want)
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    for k in names + (["kl"] if beta else []):
        np.testing.assert_allclose(float(m[k]), want_m[k], rtol=TOL, atol=TOL, err_msg=k)
    assert 0.0 < want_m["clip_ratio/region_mean"] < 1.0  # clipping binds on part of the batch
    for path, (name, layer, transpose) in GRADS.items():
        g = grads
        for k in path if layer is None else path[:-1]:
            g = g[k]
        g = np.asarray(g if layer is None else g[layer], np.float64)
        ref_g = want_g[name].T if transpose else want_g[name]
        assert g.shape == ref_g.shape, (path, g.shape, ref_g.shape)
        scale_g = max(1.0, float(np.abs(ref_g).max()))
        np.testing.assert_allclose(g, ref_g, rtol=0, atol=TOL * scale_g, err_msg=str(path))
        assert np.abs(ref_g).max() > 1e-5, path
