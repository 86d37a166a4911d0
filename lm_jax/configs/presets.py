"""Named presets: (ModelConfig, data overrides, TrainConfig). Each docstring gives the command.

Presets build on base configs with `dataclasses.replace`-style keyword overrides.
"""

from __future__ import annotations

from collections.abc import Callable

from lm_jax.configs.base import ConfigError, ModelConfig, MoEConfig, gpt2_style, llama_style
from lm_jax.configs.train import TrainConfig

Preset = tuple[ModelConfig, dict, TrainConfig]
PRESETS: dict[str, Callable[[], Preset]] = {}


def register(fn):
    PRESETS[fn.__name__] = fn
    return fn


@register
def tiny() -> Preset:
    """CPU seconds, for tests: `python experiments/pretrain.py --preset=tiny`."""
    model = gpt2_style(d_model=64, num_layers=2, num_heads=4, max_len=128, scan_unroll=2)
    data = dict(tokenizer="char", seq_len=64, batch_size=8)
    train = TrainConfig(
        steps=40,
        learning_rate=3e-3,
        warmup_steps=5,
        eval_every=0,
        eval_batches=4,
        save_every=20,
        log_every=10,
        sample_tokens=60,
    )
    return model, data, train


@register
def default() -> Preset:
    """The README's main job: a small char-level GPT on Shakespeare's complete works, ~5 min on
    2 CPU cores. `python experiments/pretrain.py` (same as --preset=default)."""
    model = gpt2_style(d_model=192, num_layers=4, num_heads=6, max_len=128, scan_unroll=4)
    data = dict(tokenizer="char", seq_len=128, batch_size=32)
    train = TrainConfig(
        steps=800,
        learning_rate=2e-3,
        warmup_steps=50,
        min_lr_ratio=0.1,
        beta2=0.99,
        eval_every=400,
        eval_batches=40,
        save_every=400,
        log_every=25,
        workdir="runs/default",
    )
    return model, data, train


@register
def nanogpt_cpu() -> Preset:
    """nanoGPT's documented CPU recipe for char-level Tiny Shakespeare (val loss ~1.88):
    4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iters, lr 1e-3 decayed to 2000,
    dropout 0. `python experiments/pretrain.py --preset=nanogpt_cpu
    --data.source=tinyshakespeare:../shared/data/tinyshakespeare/input.txt`. The block is
    GPT-2's (biases, tanh GELU); nanoGPT's own is `--model.use_bias=false
    --model.activation=gelu` (8-seed medians 1.892 and 1.906, benchmarks/RESULTS.md)."""
    model = gpt2_style(
        d_model=128, num_layers=4, num_heads=4, max_len=64, dropout=0.0, scan_unroll=4
    )
    data = dict(
        tokenizer="char",
        seq_len=64,
        batch_size=12,
        source="tinyshakespeare:../shared/data/tinyshakespeare/input.txt",
    )
    train = TrainConfig(
        steps=2000,
        learning_rate=1e-3,
        warmup_steps=100,
        lr_decay_steps=2000,
        min_lr_ratio=0.1,
        beta2=0.99,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_every=250,
        eval_batches=0,
        save_every=1000,
        log_every=50,
        workdir="runs/nanogpt_cpu",
    )
    return model, data, train


@register
def shakespeare_char() -> Preset:
    """nanoGPT's baby GPT: 6 layers, 6 heads, 384 dims, context 256, dropout 0.2.
    `python experiments/pretrain.py --preset=shakespeare_char` (a GPU is advised)."""
    model = gpt2_style(d_model=384, num_layers=6, num_heads=6, max_len=256, dropout=0.2)
    data = dict(tokenizer="char", seq_len=256, batch_size=64)
    train = TrainConfig(
        steps=5000,
        learning_rate=1e-3,
        warmup_steps=100,
        min_lr_ratio=0.1,
        beta2=0.99,
        eval_every=250,
        eval_batches=200,
        save_every=1000,
        workdir="runs/shakespeare_char",
    )
    return model, data, train


@register
def llama_small() -> Preset:
    """A small Llama (RoPE, RMSNorm, SwiGLU, GQA 8/2) with an 8k SentencePiece BPE.
    `python experiments/pretrain.py --preset=llama_small`."""
    model = llama_style(
        d_model=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        mlp_dim=688,
        max_len=256,
        vocab_size=8192,
    )
    data = dict(tokenizer="sentencepiece:bpe:8192", seq_len=256, batch_size=16)
    train = TrainConfig(
        steps=2000,
        learning_rate=1e-3,
        warmup_steps=100,
        eval_every=250,
        save_every=500,
        workdir="runs/llama_small",
    )
    return model, data, train


@register
def ptb_transformer() -> Preset:
    """A small Llama-style Transformer on Penn Treebank (a 10k SentencePiece BPE over PTB's
    own 10k-word text), the Transformer row beside the n-gram and LSTM baselines:
    `python experiments/pretrain.py --preset=ptb_transformer`, then
    `python experiments/evaluate.py --checkpoint=runs/ptb_transformer --task=ptb`."""
    model = llama_style(
        d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=688, max_len=128,
        vocab_size=10_000, dropout=0.2, tie_embeddings=True,
    )  # fmt: skip
    data = dict(source="ptb", tokenizer="sentencepiece:bpe:10000", seq_len=128, batch_size=32)
    train = TrainConfig(
        steps=1500, learning_rate=2e-3, warmup_steps=100, weight_decay=0.1, eval_every=250,
        eval_batches=0, save_every=250, workdir="runs/ptb_transformer",
    )  # fmt: skip
    return model, data, train


@register
def moe_small() -> Preset:
    """llama_small with 8 experts, top-2, dropless, in every layer.
    `python experiments/pretrain.py --preset=moe_small`."""
    model, data, train = llama_small()
    model = model.replace(moe=MoEConfig(num_experts=8, top_k=2), mlp_dim=344)
    return model, data, train.replace(workdir="runs/moe_small")


@register
def gpt2_124m() -> Preset:
    """GPT-2 small (124M): 12 layers, 12 heads, 768 dims, context 1024. Accelerator preset:
    `python experiments/pretrain.py --preset=gpt2_124m --data.source=tfds:lm1b`."""
    model = gpt2_style(d_model=768, num_layers=12, num_heads=12, max_len=1024, vocab_size=50304)
    data = dict(tokenizer="sentencepiece:bpe:32000", seq_len=1024, batch_size=32)
    train = TrainConfig(
        steps=20000,
        learning_rate=6e-4,
        warmup_steps=700,
        beta2=0.95,
        eval_every=1000,
        save_every=1000,
        workdir="runs/gpt2_124m",
    )
    return model, data, train


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
