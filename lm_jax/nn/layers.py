"""Parameter-holding building blocks: Dense, Embed, norms. The maths stays in pure functions."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.lora import ROWS, maybe_lora, row_lora
from lm_jax.prompts import check_ids


def normal_init(std: float):
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """y = x @ kernel (+ bias). kernel [D_in, D_out] carries logical `names`.

    Every projection of the model is one of these, so a path pattern such as
    `layers/attn/q_proj` reaches its kernel (LoRA targets them by regex over paths).
    """

    features: int
    names: tuple[str | None, str | None]
    cfg: ModelConfig
    use_bias: bool = False
    init_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        std = cfg.initializer_range if self.init_std is None else self.init_std
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(std), self.names),
            (x.shape[-1], self.features),
            cfg.weight_dtype,
        )
        # A 2-D matmul: XLA:CPU runs [B*T, D] @ [D, F] (and its transposes in the backward
        # pass) markedly faster than the same dot on a [B, T, D] operand.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).astype(cfg.compute_dtype)
        y = jnp.dot(x2, kernel.astype(cfg.compute_dtype)).reshape(*lead, self.features)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.names[1],)),
                (self.features,),
                cfg.weight_dtype,
            )
            y = y + bias.astype(cfg.compute_dtype)
        if cfg.lora is not None:
            # LoRA (lm_jax.nn.lora): lora_a/lora_b beside kernel when the path is targeted; the
            # base output is complete before the (zero at init) low-rank path is added.
            y2 = maybe_lora(
                self, x2, y.reshape(x2.shape[0], self.features), kernel.shape, self.names, cfg
            )
            y = y2.reshape(*lead, self.features)
        if self.has_variable(ROWS, "lora_a"):  # per-request adapters (multi-adapter decode)
            y = row_lora(self, x.astype(cfg.compute_dtype), y)
        return y


def check_token_ids(tokens, vocab_size: int) -> None:
    """Raise if concrete token ids fall outside [0, vocab_size). No-op on tracers."""
    if isinstance(tokens, jax.core.Tracer):
        return
    hint = "check the tokenizer matches the model, and that pad ids (e.g. -1) are replaced "
    check_ids(np.asarray(tokens), vocab_size, "token ids", hint + "before the model sees them.")


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` gives tied output logits."""

    num_embeddings: int
    cfg: ModelConfig
    names: tuple[str | None, str | None] = ("vocab", "embed")

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(normal_init(self.cfg.initializer_range), self.names),
            (self.num_embeddings, self.cfg.d_model),
            self.cfg.weight_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        # flax's Embed gives NaN for id >= V and wraps -1: validate concrete ids eagerly and keep
        # out-of-range ids visible (NaN, caught by the trainer's finite check) under tracing.
        check_token_ids(ids, self.num_embeddings)
        table = self.embedding.astype(self.cfg.compute_dtype)
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding.astype(self.cfg.compute_dtype)
        return jnp.einsum("btd,vd->btv", x.astype(self.cfg.compute_dtype), table)


def _reduce_to(g: jax.Array, like: jax.Array) -> jax.Array:
    """Sum a [..., D] gradient over its leading axes, in the dtype of the [D] parameter."""
    return jnp.sum(g, axis=tuple(range(g.ndim - 1))).astype(like.dtype)


def _rms_forward(x, scale, eps):
    xf = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    xhat = xf * rstd
    return xhat * scale.astype(jnp.float32), (xhat, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, as Llama: x / rms(x) * scale. [..., D], [D] -> [..., D] float32.

    Hand-written backward (one pass over the rows, from the saved x / rms(x)): on XLA:CPU the
    autodiff chain of the mean/rsqrt is several passes."""
    return _rms_forward(x, scale, eps)[0]


def _rms_fwd(x, scale, eps):
    y, (xhat, rstd) = _rms_forward(x, scale, eps)
    return y, (xhat, rstd, scale, jnp.zeros((0,), x.dtype))  # last: x's dtype


def _rms_bwd(eps, res, dy):
    xhat, rstd, scale, x_like = res
    dy = dy.astype(jnp.float32)
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    return dx.astype(x_like.dtype), _reduce_to(dy * xhat, scale)


rms_norm.defvjp(_rms_fwd, _rms_bwd)


def _ln_forward(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (xf - mean) * rstd
    return xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32), (xhat, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm in float32. [..., D], [D], [D] -> [..., D] float32.

    Hand-written backward, dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy * scale: one
    pass over the rows instead of autodiff's several (+4% training tokens/s on XLA:CPU)."""
    return _ln_forward(x, scale, bias, eps)[0]


def _ln_fwd(x, scale, bias, eps):
    y, (xhat, rstd) = _ln_forward(x, scale, bias, eps)
    return y, (xhat, rstd, scale, bias, jnp.zeros((0,), x.dtype))  # last: x's dtype


def _ln_bwd(eps, res, dy):
    xhat, rstd, scale, bias, x_like = res
    dy = dy.astype(jnp.float32)
    g = dy * scale.astype(jnp.float32)
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gx = jnp.mean(g * xhat, axis=-1, keepdims=True)
    dx = rstd * (g - mean_g - xhat * mean_gx)
    return dx.astype(x_like.dtype), _reduce_to(dy * xhat, scale), _reduce_to(dy, bias)


layer_norm.defvjp(_ln_fwd, _ln_bwd)


def layer_norm_autodiff(x, scale, bias, eps):
    """`layer_norm` with JAX's own backward pass (the baseline its hand-written one is timed
    against in `benchmarks.train_step_ab`)."""
    return _ln_forward(x, scale, bias, eps)[0]


def rms_norm_autodiff(x, scale, eps):
    """`rms_norm` with JAX's own backward pass."""
    return _rms_forward(x, scale, eps)[0]


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x as is when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Norm(nn.Module):
    """RMSNorm or LayerNorm per config over the last axis; computes in float32, returns the
    compute dtype. With `cfg.norm_unit_offset` (Gemma) the stored scale w is zero-init and the
    norm multiplies by (1 + w) in float32, as transformers' Gemma RMSNorm."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = x.shape[-1]
        init = nn.initializers.zeros_init() if cfg.norm_unit_offset else nn.initializers.ones_init()
        scale = self.param(
            "scale", nn.with_logical_partitioning(init, ("norm",)), (d,), cfg.weight_dtype
        )
        if cfg.norm == "rmsnorm":
            if cfg.norm_unit_offset:
                scale = 1.0 + scale.astype(jnp.float32)
            y = rms_norm(x, scale, cfg.norm_eps)
        else:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                (d,),
                cfg.weight_dtype,
            )
            y = layer_norm(x, scale, bias, cfg.norm_eps)
        return y.astype(cfg.compute_dtype)
