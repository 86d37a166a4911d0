"""transformers <-> lm_jax: logits of random-init HF models match (f32, <= 1e-4); export round trip
is bitwise; folders load; bad input fails clearly."""

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_jax.configs import ConfigError, RopeScaling  # noqa: E402
from lm_jax.convert import from_hf, to_hf  # noqa: E402
from lm_jax.nn import Transformer  # noqa: E402

TOL = 1e-4
T = 80  # sequence length (> Mistral's window)
V = 101

_LLAMA = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

CASES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_positions=128,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
    ),  # fmt: skip
    "llama_gqa": lambda: transformers.LlamaConfig(**_LLAMA, tie_word_embeddings=True),
    "llama_untied_bias": lambda: transformers.LlamaConfig(
        **_LLAMA, tie_word_embeddings=False, attention_bias=True, mlp_bias=True
    ),
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(
        **_LLAMA,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_linear_rope": lambda: transformers.LlamaConfig(
        **_LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.5}
    ),
    "mistral_window": lambda: transformers.MistralConfig(
        **{**_LLAMA, "num_attention_heads": 4}, sliding_window=16, tie_word_embeddings=False
    ),
}
_CLASSES = {
    "gpt2": transformers.GPT2LMHeadModel,
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
}


def _hf_model(name):
    torch.manual_seed(0)
    c = CASES[name]()
    c._attn_implementation = "eager"
    return _CLASSES[c.model_type](c).eval().float()


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


def test_logits_match_hf(case):
    name, model, tokens, ref = case
    cfg, params = from_hf(model)
    assert cfg.max_len == 128 and cfg.param_dtype == "float32"
    if name == "llama_gqa":
        assert (cfg.num_heads, cfg.kv_heads, cfg.tie_embeddings) == (6, 2, True)
    if name == "llama_untied_bias":
        assert cfg.use_bias and not cfg.tie_embeddings and "lm_head" in params
    if name == "llama3_rope_scaling":
        assert cfg.rope_scaling == RopeScaling(4.0, 1.0, 4.0, 64)
    if name == "llama_linear_rope":
        assert cfg.rope_scaling == RopeScaling(factor=2.5, rope_type="linear")
    if name == "mistral_window":
        assert cfg.sliding_window == 16 < T
    if name == "gpt2":
        assert cfg.activation == "gelu_tanh" and cfg.position == "learned"
    out = _ours(cfg, params, tokens)
    diff = float(np.max(np.abs(out - ref)))
    print(f"{name}: max |logit diff| {diff:.2e} (max |logit| {np.max(np.abs(ref)):.2f})")
    assert diff <= TOL, diff


def test_export_round_trip_is_exact(case, tmp_path):
    name, model, tokens, ref = case
    cfg, params = from_hf(model)
    to_hf(cfg, params, tmp_path)
    hf_conf = json.loads((tmp_path / "config.json").read_text())
    assert hf_conf["model_type"] == model.config.model_type
    cfg2, params2 = from_hf(tmp_path)
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), ref)


def test_load_from_saved_folder(case, tmp_path):
    name, model, _, _ = case
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert list(tmp_path.glob("*.safetensors"))
    cfg, params = from_hf(model)
    cfg_dir, params_dir = from_hf(str(tmp_path))
    assert cfg_dir == cfg
    _assert_trees_equal(params, params_dir)


# --------------------------------------------------------------------------- bad input


def test_unsupported_model_type_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "hidden_size": 8}))
    supported = "['gemma2', 'gemma3_text', 'gpt2', 'llama', 'mistral', 'mixtral', 'qwen2', 'qwen3']"
    with pytest.raises(ConfigError, match=r"'bart'.*" + re.escape(supported)):
        from_hf(tmp_path)


def test_encoder_model_type_points_at_the_encoder_converter(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"'bert' is an encoder.*hf_bert\.from_hf"):
        from_hf(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = _hf_model("gpt2")
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["vocab_size"] = V + 1
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"transformer\.wte\.weight"):
        from_hf(tmp_path)


def test_export_refuses_an_unrepresentable_config():
    from lm_jax.configs import llama_style

    cfg = llama_style(vocab_size=V, d_model=32, num_heads=4, num_layers=1, use_bias=True)
    with pytest.raises(ConfigError, match="model_type 'mistral'"):
        to_hf(cfg.replace(sliding_window=4), {}, "/nonexistent", model_type="mistral")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_lm_jax_init_matches_hf(family, tmp_path):
    import flax.linen as nn
    import jax

    from lm_jax.configs import gpt2_style, llama_style

    if family == "gpt2":
        cfg = gpt2_style(vocab_size=V, d_model=32, num_heads=4, num_layers=2, max_len=T)
    else:
        cfg = llama_style(
            vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, max_len=T,
            mlp_dim=48, tie_embeddings=False, initializer_range=0.1,
        )  # fmt: skip
    tokens = _tokens(B=1)
    params = Transformer(cfg).init(jax.random.key(0), tokens)["params"]  # boxed jax arrays
    to_hf(cfg, params, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    diff = np.max(np.abs(_hf_logits(hf.eval(), tokens) - _ours(cfg, nn.unbox(params), tokens)))
    assert diff <= TOL, diff
