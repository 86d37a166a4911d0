"""`T5Config`: an encoder-decoder of the T5 family (`lm_jax.nn.t5.T5`).

The blocks' width, heads, head dim (`d_kv`), feed-forward size and kind, norm epsilon, dropout
and dtypes live in a `ModelConfig` (`model`, the one config the shared Dense / Embed / Norm / MLP
layers read; `model.num_layers` = encoder layers). T5's maths: RMSNorm without mean or bias
(eps 1e-6), no biases, no attention scaling (folded into the init), relative position buckets
shared by the layers of a stack, ReLU (v1.0) or gated tanh-GELU (v1.1) feed-forwards.
`t5_style(...)` gives such a `ModelConfig`; `model.max_len` bounds the decoder's KV cache.
"""

from __future__ import annotations

import dataclasses

from lm_jax.configs.base import ConfigError, ModelConfig, with_model_from_dict


def t5_style(feed_forward: str = "relu", **kw) -> ModelConfig:
    """A `ModelConfig` with T5's block maths; feed_forward "relu" (v1.0) or "gated-gelu"."""
    if feed_forward not in ("relu", "gated-gelu"):
        raise ConfigError(f"feed_forward must be 'relu' or 'gated-gelu', got {feed_forward!r}")
    gated = feed_forward == "gated-gelu"
    base = dict(
        vocab_size=32128, d_model=512, num_layers=6, num_heads=8, head_dim=64, mlp_dim=2048,
        max_len=512, norm="rmsnorm", norm_eps=1e-6, activation="gelu_tanh" if gated else "relu",
        gated_mlp=gated, use_bias=False, position="learned", tie_embeddings=True,
        initializer_range=1.0,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5: shared token embedding -> encoder (L bidirectional blocks: RMSNorm -> self-attention
    + relative bias -> residual; RMSNorm -> FF -> residual; final RMSNorm) and decoder (causal
    self-attention + relative bias, cross-attention without bias, FF; final RMSNorm) -> LM head
    (the embedding, tied, on outputs times d_model ** -0.5 when `scale_decoder_outputs`)."""

    model: ModelConfig = dataclasses.field(
        default_factory=lambda: t5_style(
            vocab_size=256,
            d_model=64,
            num_layers=2,
            num_heads=4,
            head_dim=16,
            mlp_dim=128,
            max_len=128,
        )  # fmt: skip
    )
    num_decoder_layers: int | None = None  # None: model.num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scale_decoder_outputs: bool = True  # T5 v1.0 (tied head); v1.1 does not scale
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        m = self.model
        if not isinstance(m, ModelConfig):
            raise ConfigError("T5Config.model must be a ModelConfig (lm_jax.configs.t5.t5_style)")
        if m.norm != "rmsnorm" or m.use_bias or m.moe is not None or m.kv_heads != m.num_heads:
            raise ConfigError(
                "T5 blocks use RMSNorm, no biases, dense FFs and full multi-head attention: "
                "build model with lm_jax.configs.t5.t5_style(...)"
            )
        if self.decoder_layers < 1 or self.relative_attention_num_buckets < 2:
            raise ConfigError("num_decoder_layers must be >= 1 and relative buckets >= 2")
        if self.relative_attention_max_distance < self.relative_attention_num_buckets // 2:
            raise ConfigError("relative_attention_max_distance must be >= num_buckets / 2")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < m.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocab")

    @property
    def decoder_layers(self) -> int:
        return self.model.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def decoder_model(self) -> ModelConfig:
        """`model` with the decoder's depth (what the decoder's scan reads)."""
        return self.model.replace(num_layers=self.decoder_layers)

    def replace(self, **kw) -> T5Config:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        return with_model_from_dict(cls, d)
