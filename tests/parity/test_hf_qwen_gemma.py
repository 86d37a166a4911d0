"""transformers <-> lm_jax for Qwen2, Qwen3, Gemma 2 and Gemma 3 (text): random-init HF models of
odd sizes (GQA / MQA, head_dim != d_model / heads, sequences longer than the sliding window,
mixed sliding and global layers, soft caps, two RoPE bases) give the same f32 logits (<= 1e-4);
`to_hf` round trips; saved folders load; KV-cache decode of a converted Gemma 3 equals HF's full
forward; unsupported options fail with one-line errors."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_jax.configs import ConfigError, RopeScaling  # noqa: E402
from lm_jax.convert import from_hf, hf_model_type, to_hf  # noqa: E402
from lm_jax.nn import Transformer, init_cache  # noqa: E402

TOL = 1e-4
T = 40  # > every sliding window below

_COMMON = dict(max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-6)

CASES = {
    # q/k/v biases (o_proj and MLP without), GQA 6/2, untied head
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=151, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, **_COMMON,
    ),
    # q/k norms, head_dim 24 != 80 / 4, tied; layer 1 slides (window 16), layer 0 is global
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=101, hidden_size=80, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=16, max_window_layers=1, **_COMMON,
    ),
    # alternating sliding / global, both soft caps small enough to bite, query scalar != H
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=263, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
        query_pre_attn_scalar=20, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
        **_COMMON,
    ),
    # 2 sliding layers then a global one; local base 1e4, global 1e6 with linear scaling x4;
    # MQA, head_dim 32 != 80 / 4, untied
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=199, hidden_size=80, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=12,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        },
        query_pre_attn_scalar=24, tie_word_embeddings=False, **_COMMON,
    ),
}  # fmt: skip
_CLASSES = {
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "gemma2": transformers.Gemma2ForCausalLM,
    "gemma3_text": transformers.Gemma3ForCausalLM,
}


def _hf_model(name):
    torch.manual_seed(0)
    c = CASES[name]()
    c._attn_implementation = "eager"
    model = _CLASSES[c.model_type](c).eval().float()
    gemma = c.model_type.startswith("gemma")
    with torch.no_grad():  # HF inits biases to 0 and norms to 1 (Gemma: 0): perturb them all
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if gemma or "norm" not in n else 1.0))
    return model


def _tokens(V, B=2):
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
    tokens = _tokens(model.config.vocab_size)
    return request.param, model, tokens, _hf_logits(model, tokens)


def test_logits_match_hf(case):
    name, model, tokens, ref = case
    cfg, params = from_hf(model)
    if name == "qwen2":
        attn = params["layers"]["attn"]
        assert cfg.qkv_bias and not cfg.use_bias
        assert "bias" in attn["q_proj"] and "bias" not in attn["o_proj"]
    if name == "qwen3":
        assert cfg.qk_norm and cfg.head_dim_ == 24 and cfg.layer_types == ("global", "local")
    if name == "gemma2":
        assert (cfg.attn_softcap, cfg.final_softcap) == (1.5, 2.0)
        assert cfg.layer_types == ("local", "global", "local") and cfg.sliding_window == 16
        assert float(np.max(np.abs(ref))) <= 2.0  # the final cap is active
    if name == "gemma3":
        assert cfg.layer_types == ("local", "local", "global") and cfg.sliding_window == 12 < T
        assert (cfg.rope_local_theta, cfg.rope_theta) == (1e4, 1e6)
        assert cfg.rope_scaling == RopeScaling(factor=4.0, rope_type="linear")
        assert cfg.qk_norm and cfg.query_pre_attn_scalar == 24 and cfg.kv_heads == 1
    out = _ours(cfg, params, tokens)
    diff = float(np.max(np.abs(out - ref)))
    print(f"{name}: max |logit diff| {diff:.2e} (max |logit| {np.max(np.abs(ref)):.2f})")
    assert diff <= TOL, diff


def test_export_round_trip_is_exact(case, tmp_path):
    name, model, tokens, ref = case
    cfg, params = from_hf(model)
    assert hf_model_type(cfg) == model.config.model_type
    to_hf(cfg, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == (
        model.config.model_type
    )
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
    cfg, params = from_hf(model)
    cfg_dir, params_dir = from_hf(str(tmp_path))
    assert cfg_dir == cfg
    _assert_trees_equal(params, params_dir)


def test_gemma3_kv_cache_decode_equals_hf_full_forward():
    model = _hf_model("gemma3")
    tokens = _tokens(model.config.vocab_size)
    ref = _hf_logits(model, tokens)
    cfg, params = from_hf(model)
    apply = jax.jit(lambda tok, pos, cache: Transformer(cfg).apply(
        {"params": params}, tok, pos, cache=cache))  # fmt: skip
    P = 5  # prefill 5 tokens, then decode one at a time past the window (12)
    pos = np.broadcast_to(np.arange(P, dtype=np.int32), (2, P))
    logits, cache = apply(tokens[:, :P], pos, init_cache(cfg, 2, T))
    outs = [np.asarray(logits)]
    for t in range(P, T):
        pos = np.full((2, 1), t, np.int32)
        logits, cache = apply(tokens[:, t : t + 1], pos, cache)
        outs.append(np.asarray(logits))
    diff = float(np.max(np.abs(np.concatenate(outs, 1) - ref)))
    assert diff <= TOL, diff


# --------------------------------------------------------------------------- bad input


def _config_dict(name, **kw):
    return {**CASES[name]().to_dict(), **kw}


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("qwen3", {"attention_bias": True}, "Qwen3 attention_bias=True"),
        ("gemma2", {"attention_bias": True}, "Gemma attention_bias=True"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma2", {"layer_types": ["sliding_attention"]}, "each of the 3 layers"),
        ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
    ],
)
def test_unsupported_options_are_one_line_errors(tmp_path, name, kw, match):
    (tmp_path / "config.json").write_text(json.dumps(_config_dict(name, **kw)))
    with pytest.raises(ConfigError, match=match) as e:
        from_hf(tmp_path)
    assert "\n" not in str(e.value)


def test_gemma3_sliding_rope_scaling_is_refused(tmp_path):
    d = _config_dict("gemma3")
    d["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="sliding-layer RoPE scaling"):
        from_hf(tmp_path)


def test_gemma3_4x_config_keys_are_read():
    """transformers 4.x Gemma 3 keys: rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern instead of rope_parameters / layer_types."""
    from lm_jax.convert.hf_gemma import GEMMA3

    d = _config_dict("gemma3")
    for key in ("rope_parameters", "layer_types"):
        del d[key]
    d.update(
        rope_theta=5e5, rope_local_base_freq=100.0, sliding_window_pattern=2,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )  # fmt: skip
    cfg = GEMMA3.config_from_hf(d)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (5e5, 100.0)
    assert cfg.rope_scaling == RopeScaling(factor=8.0, rope_type="linear")
    assert cfg.layer_types == ("local", "global", "local")


def test_qwen_and_gemma_configs_are_not_written_as_llama():
    for name in ("qwen2", "qwen3", "gemma2", "gemma3"):
        cfg, params = from_hf(_hf_model(name))
        with pytest.raises(ConfigError, match="cannot be written as model_type 'llama'"):
            to_hf(cfg, params, "/nonexistent", model_type="llama")
