"""FLOP counting against closed forms (GPT-2 124M: ~85M non-embedding params)."""

from lm_jax.configs import MoEConfig, gpt2_style, llama_style
from lm_jax.flops import flops_per_token, matmul_params


def test_gpt2_124m_matmul_params_match_the_closed_form():
    cfg = gpt2_style(d_model=768, num_layers=12, num_heads=12, vocab_size=50257, max_len=1024)
    assert matmul_params(cfg) == 12 * 12 * 768**2 + 768 * 50257  # 84.9M + tied head
    assert flops_per_token(cfg, 1024) == 6 * matmul_params(cfg) + 12 * 12 * 1024 * 768


def test_moe_counts_only_active_experts():
    dense = llama_style(d_model=64, num_layers=2, num_heads=4, mlp_dim=128, vocab_size=100)
    moe = dense.replace(moe=MoEConfig(num_experts=8, top_k=2))
    extra = matmul_params(moe) - matmul_params(dense)
    assert extra == 2 * (3 * 64 * 128 + 64 * 8)  # one more active expert + router, per layer


def test_sliding_window_counts_only_in_local_layers():
    base = llama_style(d_model=64, num_layers=6, num_heads=4, vocab_size=100, max_len=1024)
    mixed = base.replace(sliding_window=128, layer_types=("local",) * 5 + ("global",))
    n = matmul_params(base)
    assert flops_per_token(mixed, 1024) == 6 * n + 12 * (5 * 128 + 1024) * 64
    assert flops_per_token(base.replace(sliding_window=128), 1024) == 6 * n + 12 * 6 * 128 * 64
