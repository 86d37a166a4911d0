"""The T5-family encoder-decoder (`T5Config`), on the shared Dense / Embed / Norm layers and the
one scan over blocks.

    source [B, S] -> embed -> dropout -> encoder blocks (scanned) -> RMSNorm -> dropout
        enc [B, S, D]
    target_in [B, T] -> embed -> dropout -> decoder blocks (scanned) -> RMSNorm -> dropout
        -> (x d_model ** -0.5 when scale_decoder_outputs) -> tied or untied head  logits [B, T, V]

Attention: scores = q k^T + bias (no 1/sqrt(d) scale, T5's convention), softmax in float32.
Self-attention bias = a learned [buckets, heads] table per stack (`encoder_rel_bias`,
`decoder_rel_bias`) looked up by `relative_position_bucket(key - query)`; cross-attention has
no bias. Padding: `source_mask` [B, S] (1 = token) masks the encoder's keys and the
cross-attention keys; the decoder is causal.

Decoding (`init_cache`, `decode_step`): one token per call for every row in lockstep. The
self-attention keys / values go into a [L, B, max_len, heads, d_kv] cache; the cross-attention
keys / values are computed from the encoder output once, in the call that reads the decoder's
start token, and reused by every later step.

Params (HF `T5ForConditionalGeneration` names in brackets; `lm_jax.convert.hf_t5` maps them):
    shared/embedding [V, D] (shared), encoder_rel_bias / decoder_rel_bias [buckets, N]
    (block.0.layer.0.SelfAttention.relative_attention_bias), encoder/layers/... [L, ...]:
    attn_norm, attn/{q,k,v,o}_proj, mlp_norm, mlp/{wi | wi_0, wi_1, wo}; decoder/layers/...
    adds cross_norm, cross/{q,k,v,o}_proj; encoder_norm, decoder_norm; lm_head [D, V] if untied.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax.configs.base import ModelConfig
from lm_jax.configs.t5 import T5Config
from lm_jax.nn.layers import Dense, Embed, Norm, normal_init
from lm_jax.nn.mlp import ACTIVATIONS
from lm_jax.nn.scan import scan_blocks

NEG = -1e9  # additive mask value (float32 scores)


class DecodeCache(NamedTuple):
    """Per decoder layer (leading axis L): self-attention k / v [L, B, max_len, N, H], and
    cross-attention k / v [L, B, S, N, H]; `index`: the position the next token is written to."""

    k: jax.Array
    v: jax.Array
    cross_k: jax.Array
    cross_v: jax.Array
    index: jax.Array


def relative_position_bucket(rel, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of relative position `rel` = key - query (int array): exact buckets for the
    nearest half, log-spaced ones up to `max_distance`; bidirectional splits by sign."""
    out = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).astype(rel.dtype) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (ratio * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return out + jnp.where(n < max_exact, n, large)


def attention(q, k, v, bias, mask, dropout_rng=None, rate: float = 0.0):
    """q [B, T, N, H], k / v [B, S, N, H], bias [1|B, N, T, S] or None, mask [B, 1, T|1, S] bool
    -> [B, T, N, H]; no scaling (T5)."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        s = s + bias
    s = jnp.where(mask, s, NEG)
    p = jax.nn.softmax(s, axis=-1)
    if dropout_rng is not None and rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, p.shape)
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v)


class T5Attention(nn.Module):
    """q / k / v / o projections (HF init stds) around `attention`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, kv, bias, mask, deterministic: bool, kv_cache=None, write_at=None):
        """x [B, T, D] -> (out [B, T, D], (k, v)). Keys / values: projected from `kv` [B, S, D];
        or `kv_cache` = (k, v) as they are (cross-attention steps); or, with `write_at` (a
        position), x's own keys / values written into `kv_cache` there (self-attention steps)."""
        cfg = self.cfg
        D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim_

        def project(name, y, std):
            out = Dense(N * H, ("embed", "heads"), cfg, init_std=std, name=name)(y)
            return out.reshape(*y.shape[:-1], N, H)

        q = project("q_proj", x, (D * H) ** -0.5)
        if kv is not None:
            k, v = project("k_proj", kv, D**-0.5), project("v_proj", kv, D**-0.5)
        elif write_at is not None:
            k, v = kv_cache
            k_new, v_new = project("k_proj", x, D**-0.5), project("v_proj", x, D**-0.5)
            k = jax.lax.dynamic_update_slice_in_dim(k, k_new.astype(k.dtype), write_at, 1)
            v = jax.lax.dynamic_update_slice_in_dim(v, v_new.astype(v.dtype), write_at, 1)
        else:
            k, v = kv_cache
        rng = None if deterministic or cfg.dropout == 0 else self.make_rng("dropout")
        out = attention(q, k, v, bias, mask, rng, cfg.dropout)
        out = out.reshape(*x.shape[:-1], N * H)
        o = Dense(D, ("heads", "embed"), cfg, init_std=(N * H) ** -0.5, name="o_proj")
        return o(out), (k, v)


class T5FeedForward(nn.Module):
    """wo(dropout(relu(wi x))) (v1.0) or wo(dropout(gelu(wi_0 x) * wi_1 x)) (v1.1)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.cfg
        F, D = cfg.mlp_dim_, cfg.d_model
        act = ACTIVATIONS[cfg.activation]
        if cfg.gated_mlp:
            h = act(Dense(F, ("embed", "mlp"), cfg, init_std=D**-0.5, name="wi_0")(x))
            h = h * Dense(F, ("embed", "mlp"), cfg, init_std=D**-0.5, name="wi_1")(x)
        else:
            h = act(Dense(F, ("embed", "mlp"), cfg, init_std=D**-0.5, name="wi")(x))
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return Dense(D, ("mlp", "embed"), cfg, init_std=F**-0.5, name="wo")(h)


def _residual(cfg, x, y, deterministic):
    return x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class EncoderBlock(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias, mask):
        cfg, det = self.cfg, self.deterministic
        h = Norm(cfg, name="attn_norm")(x)
        y, _ = T5Attention(cfg, name="attn")(h, h, bias, mask, det)
        x = _residual(cfg, x, y, det)
        y = T5FeedForward(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x), det)
        return _residual(cfg, x, y, det), None


class DecoderBlock(nn.Module):
    """Full pass (`cache` None) or one cached step (`cache` = this layer's (k, v, cross_k,
    cross_v, index)); with `enc` given in a step, cross k / v are computed from it."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias, mask, enc, cross_mask, cache):
        cfg, det = self.cfg, self.deterministic
        attn, cross = T5Attention(cfg, name="attn"), T5Attention(cfg, name="cross")
        h = Norm(cfg, name="attn_norm")(x)
        if cache is None:
            y, _ = attn(h, h, bias, mask, det)
        else:
            k_all, v_all, ck, cv, index = cache
            y, (k_all, v_all) = attn(h, None, bias, mask, det, (k_all, v_all), write_at=index)
        x = _residual(cfg, x, y, det)
        h = Norm(cfg, name="cross_norm")(x)
        if cache is None or enc is not None:
            y, (ck_new, cv_new) = cross(h, enc, None, cross_mask, det)
        else:
            y, (ck_new, cv_new) = cross(h, None, None, cross_mask, det, kv_cache=(ck, cv))
        x = _residual(cfg, x, y, det)
        y = T5FeedForward(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x), det)
        x = _residual(cfg, x, y, det)
        if cache is None:
            return x, None
        return x, DecodeCache(k_all, v_all, ck_new.astype(ck.dtype), cv_new.astype(cv.dtype), index)


class EncoderStack(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias, mask):
        layers = scan_blocks(EncoderBlock, self.cfg, self.deterministic,
                             in_axes=(nn.broadcast, nn.broadcast), remat=False)  # fmt: skip
        return layers(x, bias, mask)[0]


class DecoderStack(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias, mask, enc, cross_mask, cache):
        in_axes = (nn.broadcast,) * 4 + (0,)
        layers = scan_blocks(DecoderBlock, self.cfg, self.deterministic, in_axes=in_axes,
                             remat=False)  # fmt: skip
        return layers(x, bias, mask, enc, cross_mask, cache)


class T5(nn.Module):
    """`apply({'params': p}, source [B, S], target_in [B, T], source_mask [B, S])` -> logits
    [B, T, V] float32; methods `encode`, `decode`, `init_cache`, `decode_step`. Dropout is on
    when `deterministic=False` (a module attribute: training builds `T5(cfg, False)`)."""

    cfg: T5Config
    deterministic: bool = True

    def setup(self):
        c, m = self.cfg, self.cfg.model
        self.shared = Embed(m.vocab_size, m, name="shared")
        init = nn.with_logical_partitioning(normal_init(m.d_model**-0.5), (None, "heads"))
        nb = c.relative_attention_num_buckets
        self.encoder_rel_bias = self.param(
            "encoder_rel_bias", init, (nb, m.num_heads), m.weight_dtype
        )
        self.decoder_rel_bias = self.param(
            "decoder_rel_bias", init, (nb, m.num_heads), m.weight_dtype
        )
        self.encoder_norm = Norm(m)
        self.decoder_norm = Norm(m)
        self.encoder = EncoderStack(m, self.deterministic)
        self.decoder = DecoderStack(c.decoder_model, self.deterministic)
        self.drop = nn.Dropout(m.dropout)
        if not m.tie_embeddings:
            self.lm_head = Dense(m.vocab_size, ("embed", "vocab"), m, init_std=1.0)

    def _bias(self, table, q_pos, k_pos, bidirectional: bool):
        """[1, N, Tq, Tk] float32 from int positions q_pos [Tq], k_pos [Tk]."""
        c = self.cfg
        buckets = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None], bidirectional, c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
        )  # fmt: skip
        return jnp.transpose(jnp.take(table.astype(jnp.float32), buckets, axis=0), (2, 0, 1))[None]

    def encode(self, source, source_mask=None):
        """source [B, S] int, source_mask [B, S] (1 = token) -> enc [B, S, D]."""
        B, S = source.shape
        if source_mask is None:
            source_mask = jnp.ones((B, S), jnp.int32)
        det = self.deterministic
        x = self.drop(self.shared(source), deterministic=det)
        pos = jnp.arange(S)
        bias = self._bias(self.encoder_rel_bias, pos, pos, True)
        mask = source_mask.astype(bool)[:, None, None, :]
        x = self.encoder(x, bias, mask)
        return self.drop(self.encoder_norm(x), deterministic=det)

    def _head(self, x):
        c, m = self.cfg, self.cfg.model
        x = self.drop(self.decoder_norm(x), deterministic=self.deterministic)
        if c.scale_decoder_outputs:
            x = x * (m.d_model**-0.5)
        if m.tie_embeddings:
            logits = self.shared.attend(x)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def decode(self, target_in, enc, source_mask=None):
        """target_in [B, T] (the start token first), enc [B, S, D] -> logits [B, T, V]."""
        B, T = target_in.shape
        if source_mask is None:
            source_mask = jnp.ones(enc.shape[:2], jnp.int32)
        x = self.drop(self.shared(target_in), deterministic=self.deterministic)
        pos = jnp.arange(T)
        bias = self._bias(self.decoder_rel_bias, pos, pos, False)
        causal = (pos[None, :] <= pos[:, None])[None, None]  # [1, 1, T, T]
        cross_mask = source_mask.astype(bool)[:, None, None, :]
        x, _ = self.decoder(x, bias, causal, enc, cross_mask, None)
        return self._head(x)

    def __call__(self, source, target_in, source_mask=None):
        enc = self.encode(source, source_mask)
        return self.decode(target_in, enc, source_mask)

    def init_cache(self, batch: int, source_len: int, dtype=jnp.float32) -> DecodeCache:
        """An empty cache for `batch` rows, `model.max_len` target positions."""
        m, L = self.cfg.model, self.cfg.decoder_layers
        N, H = m.num_heads, m.head_dim_
        z = lambda n: jnp.zeros((L, batch, n, N, H), dtype)  # noqa: E731
        return DecodeCache(z(m.max_len), z(m.max_len), z(source_len), z(source_len), jnp.int32(0))

    def decode_step(self, token, cache: DecodeCache, source_mask, enc=None):
        """token [B, 1] at position cache.index -> (logits [B, V], cache advanced by one). Give
        `enc` [B, S, D] in the first step (cross keys / values are computed from it then)."""
        c = self.cfg
        P = c.model.max_len
        index = cache.index
        x = self.shared(token)
        bias = self._bias(self.decoder_rel_bias, index[None], jnp.arange(P), False)
        mask = (jnp.arange(P) <= index)[None, None, None, :]
        cross_mask = source_mask.astype(bool)[:, None, None, :]
        L = c.decoder_layers
        per_layer = DecodeCache(cache.k, cache.v, cache.cross_k, cache.cross_v,
                                jnp.broadcast_to(index, (L,)))  # fmt: skip
        x, new = self.decoder(x, bias, mask, enc, cross_mask, per_layer)
        logits = self._head(x)[:, 0]
        return logits, DecodeCache(new.k, new.v, new.cross_k, new.cross_v, index + 1)


def abstract_params(cfg: T5Config, rng=None):
    """Boxed abstract params of `T5(cfg)`, without allocating anything."""
    rng = jax.random.key(0) if rng is None else rng
    x = jnp.zeros((1, 4), jnp.int32)
    return jax.eval_shape(lambda r: T5(cfg).init(r, x, x)["params"], rng)
