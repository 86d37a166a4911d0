"""transformers Mixtral <-> lm_jax: dropless MoE logits of random-init HF models match (f32,
<= 1e-4); export round trip is bitwise and loads in transformers with equal logits; saved folders
(per-expert layout) load; unrepresentable MoE configs and bad checkpoints fail clearly."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_jax.configs import ConfigError, MoEConfig, llama_style  # noqa: E402
from lm_jax.convert import from_hf, hf_model_type, to_hf  # noqa: E402
from lm_jax.nn import Transformer  # noqa: E402

TOL = 1e-4
T = 40  # sequence length (> the window)
V = 101

CASES = {
    "window_untied": dict(sliding_window=16, tie_word_embeddings=False),
    "tied": dict(sliding_window=None, tie_word_embeddings=True),
}


def _hf_model(name):
    c = transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        router_aux_loss_coef=0.02,
        initializer_range=0.2,  # O(1) logits and well-separated router scores
        bos_token_id=0,
        eos_token_id=0,
        **CASES[name],
    )
    c._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(c).eval().float()


def _tokens(B=2):
    return np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _ours(cfg, params, tokens):
    return np.asarray(Transformer(cfg).apply({"params": params}, tokens))


def _assert_trees_equal(a, b, path=""):
    assert isinstance(a, dict) == isinstance(b, dict), path
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), (path, sorted(a), sorted(b))
        for k in a:
            _assert_trees_equal(a[k], b[k], f"{path}/{k}")
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model = _hf_model(request.param)
    tokens = _tokens()
    return request.param, model, tokens, _hf_logits(model, tokens)


@pytest.mark.parametrize("grouped_matmul", ["ragged_dot", "block_padded"])
def test_logits_match_hf(case, grouped_matmul):
    name, model, tokens, ref = case
    cfg, params = from_hf(model)
    assert cfg.moe == MoEConfig(
        num_experts=4,
        top_k=2,
        router="softmax_topk",
        renormalize=True,
        dispatch="dropless",
        expert_mlp_dim=48,
        load_balance_coef=0.02,
        router_z_coef=0.0,
    )
    assert (cfg.num_heads, cfg.kv_heads, cfg.max_len, cfg.param_dtype) == (4, 2, 128, "float32")
    assert cfg.rope_theta == 1e6  # MixtralConfig's default
    assert cfg.sliding_window == CASES[name]["sliding_window"]
    assert cfg.tie_embeddings == CASES[name]["tie_word_embeddings"] == ("lm_head" not in params)
    experts = params["layers"]["mlp"]["experts"]
    assert params["layers"]["mlp"]["router"]["kernel"].shape == (2, 32, 4)  # [L, D, E]
    assert experts["gate_proj"]["kernel"].shape == (2, 4, 32, 48)  # [L, E, D, F]
    assert experts["down_proj"]["kernel"].shape == (2, 4, 48, 32)  # [L, E, F, D]
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, grouped_matmul=grouped_matmul))
    out = _ours(cfg, params, tokens)
    diff = float(np.max(np.abs(out - ref)))
    print(f"mixtral {name} {grouped_matmul}: max |logit diff| {diff:.2e}", end="")
    print(f" (max |logit| {np.max(np.abs(ref)):.2f})")
    assert np.max(np.abs(ref)) > 1.0  # not a vacuous comparison of near-zero logits
    assert diff <= TOL, diff


def test_export_round_trip_is_exact(case, tmp_path):
    name, model, tokens, ref = case
    cfg, params = from_hf(model)
    assert hf_model_type(cfg) == "mixtral"
    to_hf(cfg, params, tmp_path)
    hf_conf = json.loads((tmp_path / "config.json").read_text())
    assert hf_conf["model_type"] == "mixtral"
    assert hf_conf["architectures"] == ["MixtralForCausalLM"]
    assert (hf_conf["num_local_experts"], hf_conf["num_experts_per_tok"]) == (4, 2)
    cfg2, params2 = from_hf(tmp_path)
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.sliding_window == model.config.sliding_window
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), ref)


def test_load_from_saved_folder(case, tmp_path):
    from safetensors.numpy import load_file

    name, model, _, _ = case
    saved, exported = tmp_path / "saved", tmp_path / "exported"
    model.save_pretrained(saved, safe_serialization=True)
    cfg, params = from_hf(model)  # fused in-memory layout
    cfg_dir, params_dir = from_hf(str(saved))  # per-expert layout on disk
    assert cfg_dir == cfg
    _assert_trees_equal(params, params_dir)
    # to_hf writes the tensors save_pretrained writes, under the same names
    to_hf(cfg, params, exported)
    sd_saved = load_file(saved / "model.safetensors")
    sd_ours = load_file(exported / "model.safetensors")
    assert sorted(sd_ours) == sorted(sd_saved)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in sd_ours
    for k in sd_saved:
        np.testing.assert_array_equal(sd_ours[k], sd_saved[k], err_msg=k)


def test_export_lm_jax_init_matches_hf(tmp_path):
    import flax.linen as nn
    import jax

    cfg = llama_style(
        vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, max_len=T,
        mlp_dim=48, tie_embeddings=False, initializer_range=0.2, sliding_window=8,
        moe=MoEConfig(num_experts=4, top_k=2, router_z_coef=0.0),
    )  # fmt: skip
    tokens = _tokens(B=1)
    params = Transformer(cfg).init(jax.random.key(0), tokens)["params"]  # boxed jax arrays
    to_hf(cfg, params, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(hf).__name__ == "MixtralForCausalLM"
    diff = np.max(np.abs(_hf_logits(hf.eval(), tokens) - _ours(cfg, nn.unbox(params), tokens)))
    assert diff <= TOL, diff


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "moe",
    [
        MoEConfig(num_experts=4, num_shared_experts=1),
        MoEConfig(num_experts=4, router="topk_softmax"),
        MoEConfig(num_experts=4, renormalize=False),
        MoEConfig(num_experts=4, dispatch="capacity"),
    ],
)
def test_export_refuses_unrepresentable_moe(moe):
    cfg = llama_style(vocab_size=V, d_model=32, num_heads=4, num_layers=2, moe=moe)
    with pytest.raises(ConfigError, match="no transformers architecture"):
        hf_model_type(cfg)
    with pytest.raises(ConfigError, match="model_type 'mixtral'"):
        to_hf(cfg, {}, "/nonexistent", model_type="mixtral")


def test_shape_mismatch_names_the_expert_tensor(tmp_path):
    model = _hf_model("tied")
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"block_sparse_moe\.experts\.0\.w1\.weight"):
        from_hf(tmp_path)
    conf["intermediate_size"], conf["num_local_experts"] = 48, 5
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"experts\.4\.w1\.weight' is missing"):
        from_hf(tmp_path)
