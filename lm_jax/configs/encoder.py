"""`EncoderConfig`: a bidirectional BERT-family encoder (`lm_jax.nn.encoder.Encoder`).

The blocks' width, depth, heads, MLP size, norm epsilon, activation, dropout, dtypes and the
position limit (`max_len` = HF `max_position_embeddings`) live in a `ModelConfig` (`model`),
the one config the shared attention / MLP / norm layers read; the encoder's own settings
(token types, padding id, pooler, which head) sit beside it. `bert_style(...)` gives the
`ModelConfig` with BERT's maths: LayerNorm (eps 1e-12), exact-erf GELU, biases everywhere,
learned absolute positions, tied MLM decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from lm_jax.configs.base import ConfigError, ModelConfig, with_model_from_dict

HEADS = ("none", "mlm", "token", "sequence")


def bert_style(**kw) -> ModelConfig:
    """A `ModelConfig` with BERT's block maths; `kw` overrides (vocab_size, d_model, ...)."""
    base = dict(
        vocab_size=30522,
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        max_len=512,
        norm="layernorm",
        norm_eps=1e-12,
        activation="gelu",
        gated_mlp=False,
        use_bias=True,
        position="learned",
        tie_embeddings=True,
    )
    base.update(kw)
    return ModelConfig(**base)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """A BERT-family encoder: embeddings (word + position + token type, LayerNorm) -> L post-LN
    bidirectional blocks -> optional pooler (dense + tanh on [CLS]) -> one head:

    - "none": hidden states (and pooled output) only (`BertModel`);
    - "mlm": transform (dense + act + LayerNorm) -> logits over the vocab, decoder tied to the
      word embeddings (untied when `model.tie_embeddings` is False) + bias (`BertForMaskedLM`);
    - "token": per-token logits [B, T, num_labels] (`BertForTokenClassification`);
    - "sequence": logits [B, num_labels] from the pooled output
      (`BertForSequenceClassification`; needs the pooler).
    """

    model: ModelConfig = dataclasses.field(
        default_factory=lambda: bert_style(
            vocab_size=1000, d_model=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=128
        )
    )
    type_vocab_size: int = 2  # token types (segments A / B)
    pad_token_id: int = 0  # the tokenizer's padding id (HF `pad_token_id`)
    head: Literal["none", "mlm", "token", "sequence"] = "none"
    pooler: bool = True  # HF adds none to BertForMaskedLM / BertForTokenClassification
    num_labels: int = 2  # classes of the token / sequence head
    classifier_dropout: float | None = None  # before the classifier; None = model.dropout

    def __post_init__(self):
        m = self.model
        _check(isinstance(m, ModelConfig), "EncoderConfig.model must be a ModelConfig.")
        _check(
            m.norm == "layernorm" and m.position == "learned" and not m.gated_mlp,
            "the encoder is BERT-style: model.norm='layernorm', position='learned', "
            f"gated_mlp=False (got {m.norm!r}, {m.position!r}, {m.gated_mlp}); build it with "
            "lm_jax.configs.encoder.bert_style(...).",
        )
        _check(
            m.moe is None and m.kv_heads == m.num_heads and m.sliding_window is None,
            "the encoder has dense MLPs, full multi-head attention and no sliding window: "
            "unset model.moe, num_kv_heads and sliding_window.",
        )
        _check(
            not (m.qk_norm or m.qkv_bias or m.post_norms or m.embed_scale or m.norm_unit_offset)
            and m.attn_softcap is None
            and m.final_softcap is None
            and m.query_pre_attn_scalar is None,
            "decoder-family switches (qk_norm, qkv_bias, post_norms, embed_scale, "
            "norm_unit_offset, soft caps, query_pre_attn_scalar) do not apply to the encoder.",
        )
        _check(self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}.")
        _check(
            self.type_vocab_size >= 1, f"type_vocab_size must be >= 1, got {self.type_vocab_size}."
        )
        _check(
            0 <= self.pad_token_id < m.vocab_size,
            f"pad_token_id {self.pad_token_id} is outside the vocab [0, {m.vocab_size}).",
        )
        _check(self.num_labels >= 1, f"num_labels must be >= 1, got {self.num_labels}.")
        _check(
            self.head != "sequence" or self.pooler,
            "head='sequence' classifies the pooled [CLS] output: set pooler=True.",
        )
        d = self.classifier_dropout
        _check(d is None or 0.0 <= d < 1.0, f"classifier_dropout must be in [0, 1), got {d}.")

    @property
    def classifier_dropout_(self) -> float:
        return self.model.dropout if self.classifier_dropout is None else self.classifier_dropout

    def replace(self, **kw) -> EncoderConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        return with_model_from_dict(cls, d)
