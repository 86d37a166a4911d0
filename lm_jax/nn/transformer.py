"""The decoder-only Transformer: embeddings -> scanned blocks -> norm -> logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.attention import Attention, LayerCache, RingCache
from lm_jax.nn.layers import Dense, Embed, Norm, normal_init, soft_cap
from lm_jax.nn.lora import lora_delta
from lm_jax.nn.mlp import MLP
from lm_jax.nn.moe import MoE
from lm_jax.nn.scan import remat_block, scan_blocks
from lm_jax.sharding import constrain

ACT_NAMES = ("batch", "length", "act_embed")


def feed_forward(cfg: ModelConfig, deterministic: bool = True, moe: bool | None = None):
    """The MLP slot: a dense MLP, or the MoE block (`moe`; default: when `cfg.moe` is set)."""
    if cfg.moe is not None if moe is None else moe:
        return MoE(cfg, deterministic, name="mlp")
    return MLP(cfg, name="mlp")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)). With `cfg.post_norms`
    (Gemma 2/3) the branch outputs are normed too: x + post_norm(attn(norm(x))), likewise for
    the MLP. `local`: this layer's sliding-window flag under a mixed scan (see `Attention`)."""

    cfg: ModelConfig
    deterministic: bool = True
    moe: bool | None = None  # MoE feed-forward; None = when cfg.moe is set
    causal: bool = True  # False: bidirectional attention (encoders)

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, local=None):
        cfg = self.cfg
        h, cache = Attention(cfg, self.causal, name="attn")(
            Norm(cfg, name="attn_norm")(x), positions, segment_ids, cache, local
        )
        if cfg.post_norms:
            h = Norm(cfg, name="attn_post_norm")(h)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = feed_forward(cfg, self.deterministic, self.moe)(Norm(cfg, name="mlp_norm")(x))
        if cfg.post_norms:
            h = Norm(cfg, name="mlp_post_norm")(h)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        x = constrain(x, ACT_NAMES)
        return x, cache


class LayerGroup(nn.Module):
    """`cfg.moe.every` = k consecutive blocks (`block_0` .. `block_{k-1}`), the last with the MoE
    feed-forward; scanned over L / k groups when k > 1. cache: k, v [k, B, S, K, H]; local:
    [k] bool or None."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, local=None):
        k = self.cfg.moe.every
        block, new = remat_block(Block, self.cfg.remat), []
        for i in range(k):
            c = None if cache is None else jax.tree.map(lambda t, i=i: t[i], cache)
            x, c = block(self.cfg, self.deterministic, i == k - 1, name=f"block_{i}")(
                x, positions, segment_ids, c, None if local is None else local[i]
            )
            new.append(c)
        if cache is not None:
            cache = jax.tree.map(lambda *t: jnp.stack(t), *new)
        return x, cache


def init_cache(
    cfg: ModelConfig, batch: int, length: int | None = None, dtype=None, ring: bool = False
) -> LayerCache | RingCache:
    """Zeroed KV cache for all layers: k, v [L, B, S, K, H]; `ring`: a `RingCache` of S slots
    (pos [L, B, S] = -1) for a model whose every layer is sliding-window (`ring_cache_len`)."""
    S = cfg.max_len if length is None else length
    shape = (cfg.num_layers, batch, S, cfg.kv_heads, cfg.head_dim_)
    dtype = cfg.compute_dtype if dtype is None else dtype
    if ring:
        if ring_cache_len(cfg, 1) is None:
            raise ValueError("a ring-buffer KV cache needs every layer sliding-window.")
        pos = jnp.full(shape[:3], -1, jnp.int32)
        return RingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pos)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def ring_cache_len(cfg: ModelConfig, tokens_per_call: int) -> int | None:
    """Slots of a ring-buffer cache that serves calls writing up to `tokens_per_call` tokens
    (the prefill window; 1 when decoding): window + tokens_per_call - 1. None when some layer
    attends globally (mixed local / global layers keep the full-length cache)."""
    if cfg.sliding_window is None or not all(cfg.local_layers):
        return None
    return int(cfg.sliding_window) + max(int(tokens_per_call), 1) - 1


def check_positions(positions, max_len: int) -> None:
    if isinstance(positions, jax.core.Tracer):
        return
    hi = int(np.asarray(positions).max())
    if hi >= max_len:
        raise ValueError(
            f"sequence reaches position {hi} but the model's max_len is {max_len}: shorten the "
            "prompt/sequence or build the model with a larger max_len."
        )


class Transformer(nn.Module):
    """Decoder LM. `apply({'params': p}, tokens [B,T])` -> logits [B,T,V] (float32).

    With `cache` (from `init_cache`), keys/values are written at `positions` and
    `(logits, new_cache)` is returned: prefill and one-token decode are the same call.

    `prefix_embeds` [B, P, D] (e.g. projected image features) are placed before the token
    embeddings: the sequence is [prefix; tokens] of length P + T, and `positions` /
    `segment_ids` (default 0..P+T-1 / none), the learned positions, the cache and the outputs
    ([B, P + T, ...]) all cover it. No params are added, so a plain LM's tree is unchanged.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array | None = None,  # [B, T]; default 0..T-1
        segment_ids: jax.Array | None = None,  # [B, T]; packed documents, 0 = padding
        cache: LayerCache | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        skip_head: bool = False,  # return the final-norm activations [B, T, D], no logits
        prefix_embeds: jax.Array | None = None,  # [B, P, D] before the tokens
    ):
        cfg = self.cfg
        embed = Embed(cfg.vocab_size, cfg, name="embed_tokens")
        x = embed(tokens)  # [B, T, D]
        if cfg.embed_scale:  # Gemma: sqrt(D) in the compute dtype, tokens only
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if prefix_embeds is not None:
            if prefix_embeds.ndim != 3 or prefix_embeds.shape[::2] != (x.shape[0], x.shape[2]):
                raise ValueError(
                    f"prefix_embeds must be [B={x.shape[0]}, P, D={x.shape[2]}], got shape "
                    f"{tuple(prefix_embeds.shape)}."
                )
            x = jnp.concatenate([prefix_embeds.astype(x.dtype), x], axis=1)  # [B, P + T, D]
        B, T = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        full = cache is None or isinstance(cache, RingCache)  # a ring holds any position
        check_positions(positions, cfg.max_len if full else cache.k.shape[2])
        if cfg.position == "learned":
            wpe = self.param(
                "embed_positions",
                nn.with_logical_partitioning(normal_init(cfg.initializer_range), (None, "embed")),
                (cfg.max_len, cfg.d_model),
                cfg.weight_dtype,
            )
            x = x + jnp.take(wpe.astype(cfg.compute_dtype), positions, axis=0)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = constrain(x, ACT_NAMES)

        # Layers are scanned (params with a leading L axis under `layers`); with moe.every = k > 1
        # the scan runs over L / k `LayerGroup`s of k blocks (leading axis L / k). Mixed local /
        # global layers (Gemma 2/3) scan a per-layer flag `local` [L] beside the cache.
        every = cfg.moe.every if cfg.moe is not None else 1
        n = cfg.num_layers // every
        local = jnp.asarray(cfg.local_layers) if cfg.mixed_layers else None  # [L] bool
        if every > 1 and cache is not None:  # [L, ...] -> [L / k, k, ...]
            cache = jax.tree.map(lambda c: c.reshape(n, every, *c.shape[1:]), cache)
        if every > 1 and local is not None:
            local = local.reshape(n, every)
        kw = dict(in_axes=(nn.broadcast, nn.broadcast, 0, 0))
        if every > 1:  # each LayerGroup remats its own blocks
            layers = scan_blocks(LayerGroup, cfg, deterministic, length=n, remat=False, **kw)
        else:
            layers = scan_blocks(Block, cfg, deterministic, **kw)
        x, cache = layers(x, positions, segment_ids, cache, local)
        if every > 1 and cache is not None:
            cache = jax.tree.map(lambda c: c.reshape(n * every, *c.shape[2:]), cache)
        x = Norm(cfg, name="norm")(x)  # [B, T, D]
        if skip_head:  # the loss applies the head itself, in chunks (`head_logits_fn`)
            return (x, cache) if cache is not None else x
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="lm_head")(x)
        logits = soft_cap(logits.astype(jnp.float32), cfg.final_softcap)  # Gemma 2
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        out = (logits, x) if return_hidden else logits
        if cache is not None:
            return out, cache
        return out


def head_logits_fn(params, cfg: ModelConfig):
    """The LM head as a pure function of `params`: h [..., D] -> float32 logits [..., V],
    computed as `Transformer` computes them (tied embedding or `lm_head`, LoRA included, final
    soft cap), for
    losses that apply the head in chunks (`Transformer(..., skip_head=True)`)."""
    cdt = cfg.compute_dtype
    if cfg.tie_embeddings:
        table = nn.meta.unbox(params["embed_tokens"]["embedding"])

        def project(h):
            return jnp.einsum("...d,vd->...v", h.astype(cdt), table.astype(cdt))

    else:
        head = nn.meta.unbox(params["lm_head"])

        def project(h):
            y = jnp.dot(h.astype(cdt), head["kernel"].astype(cdt))
            if "lora_a" in head:  # LoRA on the head; like `Transformer`'s lm_head (which has
                # no enclosing `deterministic` flag), it never applies LoRA dropout there
                y = y + lora_delta(None, h.astype(cdt), head["lora_a"], head["lora_b"], cfg.lora)
            return y

    def logits_fn(h):
        logits = soft_cap(project(h).astype(jnp.float32), cfg.final_softcap)
        return constrain(logits, ("batch", "length", "act_vocab"))

    return logits_fn


def abstract_params(cfg: ModelConfig, rng=None):
    """Boxed (nn.Partitioned) abstract params of `Transformer(cfg)`, without allocating anything."""
    rng = jax.random.key(0) if rng is None else rng
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    return jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens)["params"], rng)
