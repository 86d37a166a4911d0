"""Mixture-of-experts feed-forward block (takes the MLP's slot when `ModelConfig.moe` is set).

Parameters (under the layer's `mlp`, with the scan's leading L axis in a Transformer):
`router/kernel [D, E]`, `experts/{gate_proj?, up_proj} /kernel [E, D, F]`,
`experts/down_proj/kernel [E, F, D]`, `shared_experts/...` (a dense MLP, DeepSeekMoE).

Token groups: capacity-based dispatch routes within each sequence (G = B groups of S = T
tokens), so results do not depend on how the batch is sharded. Capacity dispatch is not causal
(a later token's top-1 choice can displace an earlier token's top-2 choice; expert choice picks
over the whole sequence), so KV-cache decode equals the full forward only with dropless
dispatch or a capacity that drops nothing.

The modules (`MoE`, `Experts`, `ExpertKernel`) are here; the pure parts are in `moe_routing`
(routers, capacity, auxiliary losses), `moe_dispatch` (capacity and dropless dispatch) and
`moe_parallel` (expert parallelism by all-to-all), all re-exported from this module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax.configs.base import ModelConfig
from lm_jax.nn.lora import lora_factors
from lm_jax.nn.mlp import ACTIVATIONS, MLP
from lm_jax.nn.moe_dispatch import (
    block_layout,
    block_padded_ffn,
    block_size,
    blocked_ffn,
    capacity_ffn,
    combine_tokens,
    dispatch_tokens,
    dropless_ffn,
    expert_ffn,
    grouped_matmul_impl,
    sorted_ffn,
    uses_fast_layout,
)
from lm_jax.nn.moe_parallel import _ep_mesh, check_moe_mesh, ep_capacity_ffn, ep_dropless_ffn
from lm_jax.nn.moe_routing import (
    capacity,
    capacity_masks,
    capacity_slots,
    check_router_logits,
    expert_choice_masks,
    load_balance_loss,
    router_entropy,
    router_z_loss,
    token_choice,
)


class ExpertKernel(nn.Module):
    """One stacked kernel [E, d_in, d_out] (or the router's [D, E]) at `<path>/kernel`.

    With `cfg.lora` targeting this path, LoRA factors `lora_a [E, d_in, r]`, `lora_b [E, r,
    d_out]` sit beside it and the merged kernel + a @ b * scale is returned (LoRA dropout is not
    applied to expert inputs).
    """

    shape: tuple[int, ...]
    names: tuple[str | None, ...]
    cfg: ModelConfig
    std: float

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.cfg
        init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.names)
        kernel = self.param("kernel", init, self.shape, cfg.weight_dtype)
        lora = cfg.lora
        if lora is not None and lora.matches("/".join(self.scope.path)):
            a, b = lora_factors(self, self.shape, self.names, lora, cfg.weight_dtype)
            kernel = kernel + jnp.matmul(a, b) * jnp.asarray(lora.scale, kernel.dtype)
        return kernel


class Experts(nn.Module):
    """Stacked expert kernels: `{gate_proj?, up_proj}/kernel [E, D, F]`, `down_proj/kernel
    [E, F, D]` (logical names expert, embed, mlp). Returns {"gate"?, "up", "down"}. Routed
    experts have no biases (cfg.use_bias applies to the shared experts only)."""

    cfg: ModelConfig
    num_experts: int
    mlp_dim: int

    @nn.compact
    def __call__(self, d_model: int) -> dict:
        cfg, E, F, D = self.cfg, self.num_experts, self.mlp_dim, d_model
        std, down_std = cfg.initializer_range, cfg.initializer_range / (2 * cfg.num_layers) ** 0.5
        up_names, down_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        out = {}
        for n in ("gate", "up") if cfg.gated_mlp else ("up",):
            out[n] = ExpertKernel((E, D, F), up_names, cfg, std, name=f"{n}_proj")()
        out["down"] = ExpertKernel((E, F, D), down_names, cfg, down_std, name="down_proj")()
        return out


class MoE(nn.Module):
    """Mixture-of-experts feed-forward: [B, T, D] -> [B, T, D].

    1. router logits [B, T, E] = x @ router/kernel in float32 (x jittered by U(1-eps, 1+eps)
       in training when `jitter_noise` > 0, from the 'dropout' stream);
    2. routing: top-k token choice (softmax_topk, Mixtral; topk_softmax) or expert choice;
    3. dispatch: dropless (copies sorted by expert, grouped matmul: `ragged_dot`, or
       `block_padded_ffn` on CPU, per `grouped_matmul`; block_padded multiplies by the kernels
       as stored when every expert fits R / E rows of its worst-case buffer, reported on one
       device as `dropless_fast_path`, the fraction of MoE layers that did) or capacity
       (train/eval capacity factors; 1st choices before 2nd choices, then by position; by index
       into an [E, G, C, D] buffer on one device, GShard [G, S, E, C] dispatch/combine tensors
       under expert parallelism); expert choice always uses its fixed capacity;
    4. experts: SwiGLU or GELU MLPs with stacked kernels; sharded over the `expert` mesh axis
       and exchanged by all-to-all when the context mesh has one (`ep_*_ffn`);
    5. combine with the gate weights, plus DeepSeekMoE shared experts (a dense MLP);
    6. sow `aux/moe_loss` (load_balance_coef * Switch loss + router_z_coef * z-loss) and
       `aux/moe_metrics` (load [E], dropped_fraction, router_entropy, both losses).

    NaN router logits raise when concrete (eager apply); under tracing the affected tokens'
    outputs are set to NaN (and the losses are NaN), so the error reaches the loss.
    """

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, m = self.cfg, self.cfg.moe
        B, T, D = x.shape
        E, K = m.num_experts, m.top_k
        F = m.expert_mlp_dim or cfg.mlp_dim_
        act = ACTIVATIONS[cfg.activation]
        mesh = _ep_mesh()
        if mesh is not None:
            check_moe_mesh(cfg, mesh)

        # 1. router (f32)
        router = ExpertKernel((D, E), ("embed", None), cfg, cfg.initializer_range, name="router")
        xr = x.astype(jnp.float32)
        if m.jitter_noise > 0 and not self.deterministic:
            lo, hi = 1.0 - m.jitter_noise, 1.0 + m.jitter_noise
            xr = xr * jax.random.uniform(self.make_rng("dropout"), xr.shape, xr.dtype, lo, hi)
        logits = jnp.einsum("btd,de->bte", xr, router().astype(jnp.float32))  # [B, T, E]
        check_router_logits(logits)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, T, E]

        kernels = Experts(cfg, E, F, name="experts")(D)  # {gate?, up, down}

        # 2-5. route, dispatch, experts, combine
        factor = m.capacity_factor_eval if self.deterministic else m.capacity_factor_train
        metrics_extra = {}
        xc = x.astype(cfg.compute_dtype)
        if m.router == "expert_choice":
            dispatch, combine = expert_choice_masks(probs, capacity(factor, T, K, E))
            load = jnp.sum(dispatch, axis=(0, 1, 3)) / jnp.sum(dispatch)  # [E]
            dropped = jnp.mean(jnp.sum(dispatch, axis=(2, 3)) == 0)
            if mesh is None:
                h = dispatch_tokens(xc, dispatch)  # [E, G, C, D]
                h = expert_ffn(h.reshape(E, -1, D), kernels, act).reshape(h.shape)
                y = combine_tokens(h, combine)  # [G, S, D]
            else:
                y = ep_capacity_ffn(xc, dispatch, combine, kernels, act, mesh)
        elif m.dispatch == "capacity":
            weights, ids = token_choice(logits, K, m.router, m.renormalize)  # [B, T, K]
            load = jnp.bincount(ids.reshape(-1), length=E) / ids.size  # [E]
            cap = capacity(factor, T, K, E)
            if mesh is None:  # by index: no one-hot dispatch/combine tensors
                y, kept = capacity_ffn(xc, ids, weights, kernels, act, E, cap)
                dropped = 1.0 - jnp.mean(kept)
            else:
                dispatch, combine = capacity_masks(ids, weights, E, cap)
                dropped = 1.0 - jnp.sum(dispatch) / ids.size
                y = ep_capacity_ffn(xc, dispatch, combine, kernels, act, mesh)
        else:
            weights, ids = token_choice(logits, K, m.router, m.renormalize)  # [B, T, K]
            load = jnp.bincount(ids.reshape(-1), length=E) / ids.size  # [E]
            dropped = jnp.zeros((), jnp.float32)
            gmm = {
                "impl": grouped_matmul_impl(m.grouped_matmul),
                "block": m.grouped_matmul_block,
                "fast_path": m.dropless_fast_path,
            }
            if mesh is None:
                flat = (xc.reshape(B * T, D), ids.reshape(B * T, K), weights.reshape(B * T, K))
                y = dropless_ffn(*flat, kernels, act, E, **gmm).reshape(B, T, D)
                if gmm["impl"] == "block_padded" and m.dropless_fast_path:
                    fast = uses_fast_layout(ids.reshape(-1), E, m.grouped_matmul_block)
                    metrics_extra["dropless_fast_path"] = fast.astype(jnp.float32)
            else:
                y = ep_dropless_ffn(xc, ids, weights, kernels, act, mesh, **gmm)
        if m.num_shared_experts:
            y = y + MLP(cfg, F * m.num_shared_experts, name="shared_experts")(x)
        nan_token = jnp.isnan(logits).any(axis=-1, keepdims=True)  # [B, T, 1]
        y = jnp.where(nan_token, jnp.nan, y).astype(cfg.compute_dtype)

        # 6. auxiliary losses and metrics
        lb, z = load_balance_loss(probs, load), router_z_loss(logits)
        self.sow("aux", "moe_loss", m.load_balance_coef * lb + m.router_z_coef * z)
        metrics = {
            "load": load.astype(jnp.float32),
            "dropped_fraction": jnp.asarray(dropped, jnp.float32),
            "router_entropy": router_entropy(probs),
            "load_balance_loss": lb,
            "router_z_loss": z,
            **metrics_extra,
        }
        self.sow("aux", "moe_metrics", metrics)
        return y


__all__ = [
    "ExpertKernel",
    "Experts",
    "MoE",
    "block_layout",
    "block_padded_ffn",
    "block_size",
    "blocked_ffn",
    "capacity",
    "capacity_ffn",
    "capacity_masks",
    "capacity_slots",
    "check_moe_mesh",
    "check_router_logits",
    "combine_tokens",
    "dispatch_tokens",
    "dropless_ffn",
    "ep_capacity_ffn",
    "ep_dropless_ffn",
    "expert_choice_masks",
    "expert_ffn",
    "grouped_matmul_impl",
    "load_balance_loss",
    "router_entropy",
    "router_z_loss",
    "sorted_ffn",
    "token_choice",
    "uses_fast_layout",
]
