"""The BERT-family bidirectional encoder, on the decoder's Attention / MLP / Norm / Dense / Embed
layers and its scan over blocks.

    tokens [B, T] -> word + learned position + token-type embeddings -> LayerNorm -> dropout
    -> L post-LN blocks, scanned:  x = LN(x + attn(x));  x = LN(x + mlp(x))   (GELU, biases;
       bidirectional attention over the real keys: `attention_mask` [B, T], 1 = token)
    -> hidden_states [B, T, D]
    -> pooler (optional): tanh(dense(hidden_states[:, 0]))      pooled [B, D]
    -> head (`EncoderConfig.head`): "mlm" logits [B, T, V], "token" [B, T, C],
       "sequence" [B, C] (from pooled), "none": no logits.

Params (HF BertModel names in brackets; `lm_jax.convert.hf_bert` maps them):
    embed_tokens/embedding [V, D]        (embeddings.word_embeddings)
    embed_positions [P, D]               (embeddings.position_embeddings; P = model.max_len)
    embed_token_types [TV, D]            (embeddings.token_type_embeddings)
    embed_norm/{scale, bias} [D]         (embeddings.LayerNorm)
    layers/attn/{q,k,v,o}_proj/{kernel [L, D, D], bias [L, D]}  (attention.self.*, .output.dense)
    layers/attn_norm, layers/mlp_norm    (attention.output.LayerNorm, output.LayerNorm)
    layers/mlp/{up_proj [L, D, F], down_proj [L, F, D]}          (intermediate.dense, output.dense)
    pooler/{kernel [D, D], bias [D]}     (pooler.dense)
    mlm_head/transform, mlm_head/transform_norm, mlm_head/bias [V]   (cls.predictions.*),
        mlm_head/decoder/kernel [D, V] when untied
    classifier/{kernel [D, C], bias [C]} (classifier)

Sharding: params and activations carry the decoder's logical axis names (`lm_jax.sharding`).
Attention-probability dropout (HF `attention_probs_dropout_prob`) is not applied; hidden and
classifier dropout are (when `deterministic=False`).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.configs.encoder import EncoderConfig
from lm_jax.errors import EncoderInputError
from lm_jax.nn.attention import Attention
from lm_jax.nn.layers import Dense, Embed, Norm, normal_init
from lm_jax.nn.mlp import ACTIVATIONS, MLP
from lm_jax.nn.scan import scan_blocks
from lm_jax.nn.transformer import ACT_NAMES
from lm_jax.sharding import constrain


class EncoderOutput(NamedTuple):
    """hidden_states [B, T, D] (compute dtype); pooled [B, D] or None (no pooler); logits
    float32 ([B, T, V] mlm, [B, T, C] token, [B, C] sequence) or None (head "none")."""

    hidden_states: jax.Array
    pooled: jax.Array | None
    logits: jax.Array | None


def _concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def check_encoder_inputs(cfg: EncoderConfig, tokens, token_type_ids=None, attention_mask=None):
    """Raise `EncoderInputError` (one line) when tokens [B, T], token types [B, T] or the mask
    [B, T] do not fit the model: rank, length > max_position_embeddings, type ids out of range.
    Shapes are checked under tracing too; values only when concrete."""
    shape = tuple(tokens.shape)
    P = cfg.model.max_len
    if len(shape) != 2:
        raise EncoderInputError(f"encoder tokens must be [B, T] int ids, got shape {shape}.")
    if shape[1] > P:
        raise EncoderInputError(
            f"a sequence of {shape[1]} tokens is longer than the encoder's "
            f"max_position_embeddings ({P}): truncate the input to {P} tokens."
        )
    for name, a in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
        if a is not None and tuple(a.shape) != shape:
            raise EncoderInputError(f"{name} shape {tuple(a.shape)} != tokens shape {shape}.")
    if _concrete(token_type_ids) and token_type_ids.size:
        t = np.asarray(token_type_ids)
        if t.min() < 0 or t.max() >= cfg.type_vocab_size:
            raise EncoderInputError(
                f"token_type_ids must lie in [0, {cfg.type_vocab_size}) (type_vocab_size), got "
                f"min {int(t.min())}, max {int(t.max())}."
            )


def _check_positions(positions, max_len: int) -> None:
    if _concrete(positions) and positions.size and int(np.asarray(positions).max()) >= max_len:
        raise EncoderInputError(
            f"position {int(np.asarray(positions).max())} is beyond the encoder's "
            f"max_position_embeddings ({max_len}): truncate the input."
        )


class PostLNBlock(nn.Module):
    """BERT's layer: x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x))). [B, T, D] -> same.
    `key_mask` [B, T] bool: keys to attend (None = all)."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, key_mask):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout)
        h, _ = Attention(cfg, causal=False, name="attn")(x, positions, key_mask=key_mask)
        x = Norm(cfg, name="attn_norm")(x + drop(h, deterministic=self.deterministic))
        h = MLP(cfg, name="mlp")(x)
        x = Norm(cfg, name="mlp_norm")(x + drop(h, deterministic=self.deterministic))
        return constrain(x, ACT_NAMES), None


class MLMHead(nn.Module):
    """hidden [B, T, D] -> float32 logits [B, T, V]: LN(act(dense(h))) @ table^T + bias, with
    `table` the word embeddings [V, D] (tied), else a `decoder` kernel [D, V]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h, table=None):
        cfg = self.cfg
        h = Dense(cfg.d_model, ("embed", None), cfg, True, name="transform")(h)
        h = Norm(cfg, name="transform_norm")(ACTIVATIONS[cfg.activation](h))
        if table is not None:
            tab = table.astype(cfg.compute_dtype)
            logits = jnp.einsum("btd,vd->btv", h.astype(cfg.compute_dtype), tab)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="decoder")(h)
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
            (cfg.vocab_size,),
            cfg.weight_dtype,
        )
        logits = logits.astype(jnp.float32) + bias.astype(jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))


class Encoder(nn.Module):
    """A BERT-family encoder with the head `cfg.head` (see the module docstring).

    `apply({'params': p}, tokens [B, T], token_type_ids [B, T] = 0, attention_mask [B, T] = 1,
    positions [B, T] = 0..T-1)` -> `EncoderOutput(hidden_states, pooled, logits)`.
    """

    cfg: EncoderConfig

    def _embed_table(self, name: str, rows: int):
        m = self.cfg.model
        return self.param(
            name,
            nn.with_logical_partitioning(normal_init(m.initializer_range), (None, "embed")),
            (rows, m.d_model),
            m.weight_dtype,
        )

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int
        token_type_ids: jax.Array | None = None,  # [B, T] in [0, type_vocab_size); default 0
        attention_mask: jax.Array | None = None,  # [B, T], 1 = token, 0 = padding
        positions: jax.Array | None = None,  # [B, T]; default 0..T-1
        deterministic: bool = True,
    ) -> EncoderOutput:
        ec, cfg = self.cfg, self.cfg.model
        check_encoder_inputs(ec, tokens, token_type_ids, attention_mask)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        _check_positions(positions, cfg.max_len)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, T), jnp.int32)
        cdt = cfg.compute_dtype
        embed = Embed(cfg.vocab_size, cfg, name="embed_tokens")
        x = embed(tokens)  # [B, T, D]
        x = x + jnp.take(
            self._embed_table("embed_positions", cfg.max_len).astype(cdt), positions, 0
        )
        types = self._embed_table("embed_token_types", ec.type_vocab_size).astype(cdt)
        x = x + jnp.take(types, token_type_ids, axis=0)
        x = Norm(cfg, name="embed_norm")(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = constrain(x, ACT_NAMES)

        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        layers = scan_blocks(PostLNBlock, cfg, deterministic, in_axes=(nn.broadcast, nn.broadcast))
        x, _ = layers(x, positions, key_mask)  # [B, T, D]

        pooled = None
        if ec.pooler:  # tanh(dense(h[CLS]))
            pooled = jnp.tanh(
                Dense(cfg.d_model, ("embed", None), cfg, True, name="pooler")(x[:, 0])
            )
        logits = None
        if ec.head == "mlm":
            table = embed.embedding if cfg.tie_embeddings else None
            logits = MLMHead(cfg, name="mlm_head")(x, table)
        elif ec.head in ("token", "sequence"):
            feats = x if ec.head == "token" else pooled  # [B, T, D] / [B, D]
            feats = nn.Dropout(ec.classifier_dropout_)(feats, deterministic=deterministic)
            logits = Dense(ec.num_labels, ("embed", None), cfg, True, name="classifier")(feats)
            logits = logits.astype(jnp.float32)
        return EncoderOutput(x, pooled, logits)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Mean of hidden [B, T, D] over the real tokens (attention_mask [B, T], 1 = token) ->
    float32 [B, D] (sentence-transformers' mean pooling: the token count is clamped at 1e-9)."""
    h = hidden.astype(jnp.float32)
    if attention_mask is None:
        return jnp.mean(h, axis=1)
    w = attention_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
    return jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis, float32 (torch's F.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Mean-pooled, L2-normalised sentence embeddings [B, D] float32 (all-MiniLM-L6-v2's)."""
    return l2_normalize(mean_pool(hidden, attention_mask))


def abstract_params(cfg: EncoderConfig, rng=None):
    """Boxed abstract params of `Encoder(cfg)`, without allocating anything."""
    rng = jax.random.key(0) if rng is None else rng
    tokens = jnp.zeros((1, min(8, cfg.model.max_len)), jnp.int32)
    return jax.eval_shape(lambda r: Encoder(cfg).init(r, tokens)["params"], rng)


__all__ = [
    "Encoder",
    "EncoderInputError",
    "EncoderOutput",
    "MLMHead",
    "PostLNBlock",
    "abstract_params",
    "check_encoder_inputs",
    "l2_normalize",
    "mean_pool",
    "sentence_embedding",
]
