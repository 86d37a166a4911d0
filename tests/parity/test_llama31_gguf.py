"""Llama 3.1-style GGUFs: the per-frequency RoPE factors llama.cpp's converter writes as
`rope_freqs.weight` (from HF's `rope_type="llama3"` scaling) are read and applied, so logits
equal transformers' LlamaForCausalLM with that scaling, past the original context length."""

import math

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lm_jax.configs.base import ConfigError
from lm_jax.convert.gguf import from_gguf
from lm_jax.convert.hf_llama import rope_scaling_to_hf
from lm_jax.nn import Transformer

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip


def _hf_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, rope_scaling=SCALING, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _llama_cpp_rope_factors(head_dim, base, s):
    """What llama.cpp's convert_hf_to_gguf.py writes as rope_freqs for llama3 scaling."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old, lo, hi, f = (s["original_max_position_embeddings"], s["low_freq_factor"],
                      s["high_freq_factor"], s["factor"])  # fmt: skip
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(f)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / f + smooth))
    return np.asarray(out, np.float32)


def _permute(w, n_head):  # llama.cpp's q/k row order
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def _write_gguf(model, path, rope_freqs=True, n_factors=None):
    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        }  # fmt: skip
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(q, c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(k, c.num_key_value_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs:
        head_dim = c.hidden_size // c.num_attention_heads
        factors = _llama_cpp_rope_factors(head_dim, 10000.0, SCALING)
        w.add_tensor("rope_freqs.weight", factors[:n_factors])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_rope_freqs_gguf_equals_hf_llama3_scaling(tmp_path):
    model = _hf_model()
    path = tmp_path / "llama31.gguf"
    _write_gguf(model, path)
    cfg, params, tok = from_gguf(str(path), tokenizer=False)
    assert tok is None and cfg.rope_scaling.rope_type == "factors"
    f = cfg.rope_scaling.factors
    assert f[0] == 1.0 and f[-1] == 8.0 and any(1.0 < x < 8.0 for x in f)  # all three bands
    ids = np.random.default_rng(0).integers(0, 96, (2, 150)).astype(np.int32)  # > 64 positions
    ours = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(ids)))
    with torch.no_grad():
        want = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4)
    # the factors matter: without them the same weights give other logits
    _write_gguf(model, tmp_path / "plain.gguf", rope_freqs=False)
    cfg0, params0, _ = from_gguf(str(tmp_path / "plain.gguf"), tokenizer=False)
    plain = np.asarray(Transformer(cfg0).apply({"params": params0}, jnp.asarray(ids)))
    err, plain_err = np.abs(ours - want).max(), np.abs(plain - want).max()
    assert plain_err > 1e-3 and plain_err > 20 * err, (plain_err, err)
    with pytest.raises(ConfigError, match="no Hugging Face rope_scaling form"):
        rope_scaling_to_hf(cfg.rope_scaling)


def test_rope_freqs_of_the_wrong_length_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gguf"
    _write_gguf(_hf_model(), path, n_factors=5)  # head dim 16 needs 8
    with pytest.raises(ConfigError, match="has 5 factors but head dim 16 needs 8"):
        from_gguf(str(path), tokenizer=False)
