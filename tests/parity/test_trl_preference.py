"""DPO (sigmoid) and IPO equal TRL end to end: one random tiny HF LlamaForCausalLM policy and a
second one as the reference, converted with `lm_jax.convert.from_hf`; the same preference batch
goes through TRL's `DPOTrainer.compute_loss` (its `_compute_loss`: fused-head log-probs, the
loss, the reward metrics) and through lm_jax (reference log-probs scored once by the one scorer,
`lm_jax.train.preference.reference_logps`; the policy's loss and gradient from
`lm_jax.train.preference_step.batch_loss`, the function the train step differentiates). Loss,
metrics and the gradient of several parameter tensors (mapped between the layouts) agree to
1e-5 in float32."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import jax  # noqa: E402

from lm_jax.convert import from_hf  # noqa: E402
from lm_jax.sharding import make_mesh  # noqa: E402
from lm_jax.train.preference import reference_logps  # noqa: E402
from lm_jax.train.preference_data import EncodedPair, PreferenceConfig, make_pair_batch  # noqa: E402
from lm_jax.train.preference_step import batch_loss  # noqa: E402

TOL = 1e-5
V = 101
LLAMA = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)


def hf_llama(seed):
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(**LLAMA)
    c._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(c).float()


def word_tokenizer():
    """A word-level HF tokenizer over ids t0..t100 (DPOTrainer wants one; the batch below is
    made of ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="t0", eos_token="t1", pad_token="t2", unk_token="t3"
    )


def pairs(B=4, seed=0):
    """B pairs of token ids with prompts and completions of different lengths."""
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(4, V, rng.integers(lo, hi)).tolist()  # noqa: E731
    return [{"prompt_ids": ids(2, 8), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)}
            for _ in range(B)]  # fmt: skip


def trl_run(policy, ref, examples, loss_type, beta, tmp_path):
    """TRL's loss, metrics and policy gradients (torch layout) on `examples`."""
    ds = datasets.Dataset.from_dict({"prompt": ["t5 t6"], "chosen": [" t7"], "rejected": [" t8"]})
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
    )
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds,
                             processing_class=word_tokenizer())  # fmt: skip
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    loss.backward()
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    model = trainer.model
    grads = {name: p.grad.detach().numpy().astype(np.float64)
             for name, p in model.named_parameters()}  # fmt: skip
    return float(loss.item()), m, grads


def lm_jax_run(policy, ref, examples, method, beta):
    cfg, params = from_hf(policy)
    _, ref_params = from_hf(ref)
    enc = []
    for e in examples:
        p = e["prompt_ids"]
        rows = [(np.asarray(p + e[k], np.int32), len(p)) for k in ("chosen_ids", "rejected_ids")]
        enc.append(EncodedPair(*rows, truncated=False))
    seq_len = max(len(ids) - 1 for e in enc for ids, _ in (e.chosen, e.rejected))
    pcfg = PreferenceConfig(method=method, beta=beta, seq_len=seq_len, eval_batch_size=8)
    mesh = make_mesh("", devices=jax.devices()[:1])
    refs, _ = reference_logps(cfg, ref_params, {"train": enc}, pcfg, mesh)
    batch = make_pair_batch(enc, seq_len, refs=refs["train"])
    fn = jax.value_and_grad(batch_loss, has_aux=True)
    (loss, m), grads = fn(params, batch, jax.random.key(0), model_cfg=cfg, pcfg=pcfg)
    return float(loss), jax.device_get(m), jax.device_get(grads)


# lm_jax path -> (torch name, layer index or None, transpose)
GRADS = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight", None, False),
    ("lm_head", "kernel"): ("lm_head.weight", None, True),
    ("norm", "scale"): ("model.norm.weight", None, False),
    ("layers", "attn", "q_proj", "kernel", 0): ("model.layers.0.self_attn.q_proj.weight", 0, True),
    ("layers", "attn", "v_proj", "kernel", 1): ("model.layers.1.self_attn.v_proj.weight", 1, True),
    ("layers", "mlp", "down_proj", "kernel", 1): ("model.layers.1.mlp.down_proj.weight", 1, True),
    ("layers", "attn_norm", "scale", 0): ("model.layers.0.input_layernorm.weight", 0, False),
}


@pytest.mark.parametrize(
    "method, loss_type, beta",
    [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 1.0), ("ipo", "ipo", 0.5)],
    ids=["dpo_beta0.1", "dpo_beta1", "ipo_beta0.5"],
)
def test_loss_metrics_and_gradients_match_trl(method, loss_type, beta, tmp_path):
    examples = pairs()
    policy, ref = hf_llama(0), hf_llama(1)  # a reference unlike the policy: log-ratios != 0
    want_loss, want_m, want_g = trl_run(policy, ref, examples, loss_type, beta, tmp_path)
    got_loss, got_m, got_g = lm_jax_run(policy, ref, examples, method, beta)

    assert abs(got_loss - want_loss) <= TOL * max(1.0, abs(want_loss)), (got_loss, want_loss)
    for ours, theirs in [
        ("reward_chosen", "rewards/chosen"),
        ("reward_rejected", "rewards/rejected"),
        ("reward_margin", "rewards/margins"),
        ("accuracy", "rewards/accuracies"),
        ("logp_chosen", "logps/chosen"),
        ("logp_rejected", "logps/rejected"),
    ]:
        np.testing.assert_allclose(float(got_m[ours]), want_m[theirs], rtol=TOL, atol=TOL)
    assert 0.0 < want_m["rewards/accuracies"] < 1.0  # a batch with both kinds of pairs

    for path, (name, layer, transpose) in GRADS.items():
        g = got_g
        for k in path if layer is None else path[:-1]:
            g = g[k]
        g = np.asarray(g if layer is None else g[layer], np.float64)
        ref_g = want_g[name].T if transpose else want_g[name]
        assert g.shape == ref_g.shape, (path, g.shape, ref_g.shape)
        scale = max(1.0, float(np.abs(ref_g).max()))
        np.testing.assert_allclose(g, ref_g, rtol=0, atol=TOL * scale, err_msg=str(path))
        assert np.abs(ref_g).max() > 1e-4, path  # the gradient is not trivially zero
