"""Mixture-of-experts feed-forward block (takes the MLP's slot when `ModelConfig.moe` is set).

Parameters (under the layer's `mlp`, with the scan's leading L axis in a Transformer):
`router/kernel [D, E]`, `experts/{gate_proj?, up_proj} /kernel [E, D, F]`,
`experts/down_proj/kernel [E, F, D]`, `shared_experts/...` (a dense MLP, DeepSeekMoE).

Token groups: capacity-based dispatch routes within each sequence (G = B groups of S = T
tokens), so results do not depend on how the batch is sharded. Capacity dispatch is not causal
(a later token's top-1 choice can displace an earlier token's top-2 choice; expert choice picks
over the whole sequence), so KV-cache decode equals the full forward only with dropless
dispatch or a capacity that drops nothing.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.nn.lora import lora_factors
from lm_jax.nn.mlp import ACTIVATIONS, MLP
from lm_jax.sharding import logical_to_spec

# --------------------------------------------------------------------------- routing (pure)


def token_choice(logits, top_k: int, mode: str, renormalize: bool = True):
    """Top-k token choice. logits [..., E] f32 -> (weights [..., K] f32, ids [..., K] int32).

    softmax_topk: softmax over E, keep the top k (renormalised to sum 1 as Mixtral, or raw
    probabilities as Switch top-1); topk_softmax: top k logits, softmax over those k.
    """
    if mode == "topk_softmax":
        vals, ids = jax.lax.top_k(logits, top_k)  # [..., K]
        return jax.nn.softmax(vals, axis=-1), ids
    vals, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # [..., K]
    if renormalize:
        vals = vals / jnp.sum(vals, axis=-1, keepdims=True)
    return vals, ids


def capacity(factor: float, group_size: int, top_k: int, num_experts: int) -> int:
    """Tokens per expert per group: ceil(factor * S * K / E), within [1, S]."""
    return int(min(group_size, max(1, math.ceil(factor * group_size * top_k / num_experts))))


def capacity_slots(ids, num_experts: int):
    """ids [G, S, K] -> each choice's slot index within its expert's queue [G, S, K]: slots go
    to every token's 1st choice (by position), then every 2nd choice, ... (priority order)."""
    G, S, K = ids.shape
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32)  # [G, S, K, E]
    by_priority = onehot.transpose(0, 2, 1, 3).reshape(G, K * S, num_experts)  # [G, K*S, E]
    pos = jnp.cumsum(by_priority, axis=1) - 1  # [G, K*S, E] slot index within its expert
    pos = pos.reshape(G, K, S, num_experts).transpose(0, 2, 1, 3)  # [G, S, K, E]
    return jnp.sum(pos * onehot, axis=-1)  # [G, S, K]


def capacity_ffn(x, ids, weights, kernels: dict, act, num_experts: int, cap: int):
    """Capacity dispatch by index (no [G, S, E, C] one-hot einsums): x [G, S, D], ids/weights
    [G, S, K] -> (y [G, S, D], kept [G, S, K]). Equals combine_tokens(expert_ffn(
    dispatch_tokens(x, dispatch)), combine) with `capacity_masks`' tensors, at O(G S K D) cost
    for the dispatch and combine instead of O(G S E C D)."""
    G, S, D = x.shape
    K = ids.shape[-1]
    pos = capacity_slots(ids, num_experts)  # [G, S, K]
    kept = pos < cap
    g = jnp.broadcast_to(jnp.arange(G)[:, None, None], ids.shape)  # [G, S, K]
    # flat slot of each choice in the [E, G, C] buffer; dropped choices point past its end
    flat = jnp.where(kept, (ids * G + g) * cap + pos, num_experts * G * cap).reshape(-1)
    rows = jnp.broadcast_to(x[:, :, None, :], (G, S, K, D)).reshape(-1, D)  # [G*S*K, D]
    xe = jnp.zeros((num_experts * G * cap, D), x.dtype).at[flat].set(rows, mode="drop")
    h = expert_ffn(xe.reshape(num_experts, G * cap, D), kernels, act)  # [E, G*C, D]
    out = h.reshape(-1, D).at[flat].get(mode="fill", fill_value=0).reshape(G, S, K, D)
    w = jnp.where(kept, weights, 0.0).astype(out.dtype)  # [G, S, K]
    return jnp.einsum("gsk,gskd->gsd", w, out), kept


def capacity_masks(ids, weights, num_experts: int, cap: int):
    """GShard/Switch dispatch and combine tensors with priority-ordered dropping.

    ids, weights [G, S, K] -> dispatch (0/1), combine (gate weights) [G, S, E, C]. Slots are
    handed out to every token's 1st choice (by position), then every 2nd choice, ...; a choice
    whose expert is already full (C slots) is dropped.
    """
    pos = capacity_slots(ids, num_experts)  # [G, S, K]
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)  # [G, S, K, E]
    slot = jax.nn.one_hot(jnp.where(pos < cap, pos, cap), cap, dtype=jnp.float32)  # [G, S, K, C]
    dispatch = jnp.einsum("gske,gskc->gsec", onehot, slot)  # [G, S, E, C]
    combine = jnp.einsum("gske,gskc->gsec", onehot * weights[..., None], slot)  # [G, S, E, C]
    return dispatch, combine


def expert_choice_masks(probs, cap: int):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    probs [G, S, E] (softmax over experts) -> dispatch, combine [G, S, E, C].
    """
    S = probs.shape[1]
    vals, idx = jax.lax.top_k(probs.transpose(0, 2, 1), cap)  # [G, E, C]
    dispatch = jax.nn.one_hot(idx, S, dtype=jnp.float32).transpose(0, 3, 1, 2)  # [G, S, E, C]
    return dispatch, dispatch * vals[:, None]  # [G, S, E, C]


def dispatch_tokens(x, dispatch):
    """x [G, S, D], dispatch [G, S, E, C] -> expert inputs [E, G, C, D]."""
    return jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)


def combine_tokens(y, combine):
    """Expert outputs y [E, G, C, D], combine [G, S, E, C] -> [G, S, D]."""
    return jnp.einsum("gsec,egcd->gsd", combine.astype(y.dtype), y)


def expert_ffn(x, kernels: dict, act, group_sizes=None):
    """Every expert's MLP. Batched: x [E, M, D] -> [E, M, D]; grouped: x [M, D] sorted by
    expert with `group_sizes` [E] -> [M, D] (`jax.lax.ragged_dot`; rows past the groups give 0)."""

    def mm(a, w):
        w = w.astype(a.dtype)
        if group_sizes is None:
            return jnp.einsum("emd,edf->emf", a, w)  # [E, M, F]
        return jax.lax.ragged_dot(a, w, group_sizes)  # [M, F]

    h = mm(x, kernels["up"])
    h = act(mm(x, kernels["gate"])) * h if "gate" in kernels else act(h)
    return mm(h, kernels["down"])


def grouped_matmul_impl(impl: str) -> str:
    """Resolve MoEConfig.grouped_matmul: auto -> block_padded on CPU, ragged_dot elsewhere."""
    if impl == "auto":
        return "block_padded" if jax.default_backend() == "cpu" else "ragged_dot"
    return impl


def block_layout(ids, num_experts: int, block: int, fast_path: bool = False):
    """Block-padded layout of rows with expert ids [M] (id == num_experts: skip).

    Each expert's rows are placed contiguously (in row order) from a block-aligned start, its
    group padded up to a multiple of `block` rows. The buffer holds the worst case, M + E *
    (block - 1) rows rounded up to whole blocks (with `fast_path`, to a multiple of E blocks), so
    nothing is ever dropped and shapes are static. With `fast_path`, when every expert has at
    most R / E rows, the layout is instead the fixed one: expert e owns rows [e R/E, (e+1) R/E)
    (blocks e NB/E ... ), so the blocks can be multiplied by the kernels as stored, no gather.
    Returns (dest [M]: row in the buffer, R for skipped rows; block_expert [NB]; R = NB * block;
    fast: bool scalar, the fixed layout is in use).
    """
    M, E = ids.shape[0], num_experts
    NB = -(-(M + E * (block - 1)) // block)
    if fast_path:
        NB = -(-NB // E) * E
    R = NB * block
    sizes = jnp.bincount(ids, length=E).astype(jnp.int32)  # [E]
    padded = (sizes + block - 1) // block * block  # [E]
    pend = jnp.cumsum(padded)  # [E] padded group ends
    pstart, gstart = pend - padded, jnp.cumsum(sizes) - sizes  # [E], [E]
    order = jnp.argsort(ids, stable=True)  # [M]
    rank = jnp.zeros((M,), jnp.int32).at[order].set(jnp.arange(M, dtype=jnp.int32))  # [M]
    e = jnp.minimum(ids, E - 1)  # [M]
    within = rank - gstart[e]  # [M] rank among the expert's rows
    dest = jnp.where(ids < E, pstart[e] + within, R)  # [M]
    starts = jnp.arange(NB, dtype=jnp.int32) * block  # [NB]
    block_expert = jnp.minimum(jnp.searchsorted(pend, starts, side="right"), E - 1)  # [NB]
    block_expert = block_expert.astype(jnp.int32)
    fast = jnp.array(False)
    if fast_path:
        fast = jnp.max(sizes) <= R // E
        dest = jnp.where(fast, jnp.where(ids < E, e * (R // E) + within, R), dest)
        block_expert = jnp.where(fast, jnp.arange(NB, dtype=jnp.int32) // (NB // E), block_expert)
    return dest, block_expert, R, fast


def _block_mm(a, w, block_expert, fixed: bool, transpose_w: bool = False):
    """a [NB, bs, I] @ w[e] per block -> [NB, bs, O], w [E, I, O] (or w[e]^T with `transpose_w`,
    w [E, O, I]: the input gradient). fixed: block b belongs to expert b // (NB / E), so an
    expert's blocks are one [NB/E * bs, I] matrix and w is not gathered."""
    w_spec = "oi" if transpose_w else "io"
    if fixed:
        E, (NB, bs, _) = w.shape[0], a.shape
        out = jnp.einsum(f"emi,e{w_spec}->emo", a.reshape(E, NB // E * bs, -1), w)
        return out.reshape(NB, bs, -1)
    return jnp.einsum(f"nbi,n{w_spec}->nbo", a, w[block_expert])


def _block_wgrad(a, g, block_expert, num_experts: int, fixed: bool):
    """Kernel gradient of `_block_mm`: sum over each expert's blocks of a^T g -> [E, I, O]."""
    if fixed:
        NB, bs, _ = a.shape
        m = NB // num_experts * bs
        return jnp.einsum(
            "emi,emo->eio", a.reshape(num_experts, m, -1), g.reshape(num_experts, m, -1)
        )
    per_block = jnp.einsum("nbi,nbo->nio", a, g)  # [NB, I, O]
    return jax.ops.segment_sum(per_block, block_expert, num_segments=num_experts)


def _blocked_ffn_fwd_impl(act, xb, kernels, block_expert, fixed: bool):
    mm = functools.partial(_block_mm, block_expert=block_expert, fixed=fixed)
    u = mm(xb, kernels["up"])  # [NB, bs, F]
    g = mm(xb, kernels["gate"]) if "gate" in kernels else u
    h = act(g) * u if "gate" in kernels else act(u)
    return mm(h, kernels["down"]), g, u


def _blocked_ffn_bwd_impl(act, xb, kernels, block_expert, g, u, dy, fixed: bool):
    E = kernels["up"].shape[0]
    mm_t = functools.partial(_block_mm, block_expert=block_expert, fixed=fixed, transpose_w=True)
    wgrad = functools.partial(_block_wgrad, block_expert=block_expert, num_experts=E, fixed=fixed)
    a, act_vjp = jax.vjp(act, g)  # act(g) and its vjp
    h = a * u if "gate" in kernels else a
    dh = mm_t(dy, kernels["down"])  # [NB, bs, F]
    grads = {"down": wgrad(h, dy)}
    if "gate" in kernels:
        du, (dg,) = dh * a, act_vjp(dh * u)
        grads["gate"] = wgrad(xb, dg)
        dx = mm_t(dg, kernels["gate"]) + mm_t(du, kernels["up"])
    else:
        (du,) = act_vjp(dh)
        dx = mm_t(du, kernels["up"])
    grads["up"] = wgrad(xb, du)
    return dx, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def blocked_ffn(act, xb, kernels: dict, block_expert, fast):
    """Expert MLP over row blocks: xb [NB, bs, D] -> [NB, bs, D], block b through expert
    block_expert[b]. With `fast` (a bool scalar; None = never) the layout must be the fixed one of
    `block_layout(fast_path=True)` and the kernels are used as stored; otherwise they are gathered
    per block. Both run under one `lax.cond` in the forward and one in the backward (a custom
    VJP, so the residuals, xb and the pre-activations [NB, bs, F], are the same for both)."""
    return _blocked_ffn_fwd(act, xb, kernels, block_expert, fast)[0]


def _blocked_ffn_fwd(act, xb, kernels, block_expert, fast):
    fixed, packed = (functools.partial(_blocked_ffn_fwd_impl, act, fixed=f) for f in (True, False))
    args = (xb, kernels, block_expert)
    y, g, u = packed(*args) if fast is None else jax.lax.cond(fast, fixed, packed, *args)
    return y, (xb, kernels, block_expert, fast, g, u)


def _blocked_ffn_bwd(act, res, dy):
    xb, kernels, block_expert, fast, g, u = res
    fixed, packed = (functools.partial(_blocked_ffn_bwd_impl, act, fixed=f) for f in (True, False))
    args = (xb, kernels, block_expert, g, u, dy)
    dx, dk = packed(*args) if fast is None else jax.lax.cond(fast, fixed, packed, *args)
    return dx, dk, None, None


blocked_ffn.defvjp(_blocked_ffn_fwd, _blocked_ffn_bwd)


def block_size(rows: int, num_experts: int, block: int) -> int:
    """`block`, or the next power of two >= rows / E when that is smaller."""
    return max(1, min(block, 1 << max(0, math.ceil(math.log2(max(1, -(-rows // num_experts)))))))


def block_padded_ffn(x, ids, num_experts: int, kernels: dict, act, block=128, fast_path=True):
    """Dropless grouped matmul as one batched matmul (fast on XLA:CPU, where `ragged_dot` is a
    dense loop over experts). x [M, D] rows with expert ids [M] (id == E: skip, output 0) -> [M, D].

    Rows go to `block_layout`'s buffer [NB, bs, D]; each block is multiplied by its expert's
    kernels (`blocked_ffn`: gathered per block, or as stored when `fast_path` and the loads fit
    the fixed layout); rows are read back. Padding rows are zeros and their outputs are never
    read, so the result equals `ragged_dot`'s. The block size is `block_size(M, E, block)`.
    """
    M, D = x.shape
    bs = block_size(M, num_experts, block)
    dest, block_expert, R, fast = block_layout(ids, num_experts, bs, fast_path)
    xb = jnp.zeros((R, D), x.dtype).at[dest].set(x, mode="drop").reshape(R // bs, bs, D)
    kernels = {k: w.astype(x.dtype) for k, w in kernels.items()}
    yb = blocked_ffn(act, xb, kernels, block_expert, fast if fast_path else None)  # [NB, bs, D]
    yb = yb.reshape(R, D)
    return yb.at[dest].get(mode="fill", fill_value=0)  # [M, D]


def sorted_ffn(
    x, ids, num_experts: int, kernels: dict, act, impl="ragged_dot", block=128, fast_path=True
):
    """Dropless: x [M, D] rows with expert ids [M] (id == num_experts: skip, output 0) -> [M, D].

    ragged_dot: rows are sorted by expert, run through one grouped matmul per projection, and
    unsorted. block_padded: `block_padded_ffn` (with its fixed-layout fast path unless
    `fast_path` is False).
    """
    if grouped_matmul_impl(impl) == "block_padded":
        return block_padded_ffn(x, ids, num_experts, kernels, act, block, fast_path)
    order = jnp.argsort(ids, stable=True)  # [M]
    group_sizes = jnp.bincount(ids, length=num_experts).astype(jnp.int32)  # [E]
    y = expert_ffn(x[order], kernels, act, group_sizes)  # [M, D] in expert order
    return jnp.zeros_like(y).at[order].set(y)  # [M, D]


def dropless_ffn(x, ids, weights, kernels: dict, act, num_experts: int, **gmm):
    """x [N, D], ids/weights [N, K] -> sum_k weights * expert_ids(x) [N, D]. `gmm`: impl, block,
    fast_path of `sorted_ffn`."""
    N, K = ids.shape
    y = sorted_ffn(jnp.repeat(x, K, axis=0), ids.reshape(-1), num_experts, kernels, act, **gmm)
    return jnp.einsum("nk,nkd->nd", weights.astype(y.dtype), y.reshape(N, K, -1))  # [N, D]


def uses_fast_layout(ids, num_experts: int, block: int) -> jax.Array:
    """Whether `block_padded_ffn` takes its fixed-layout fast path for expert ids [M]."""
    bs = block_size(ids.shape[0], num_experts, block)
    return block_layout(ids, num_experts, bs, fast_path=True)[3]


# --------------------------------------------------------------------------- losses (pure)


def load_balance_loss(probs, load):
    """Switch: E * sum_i f_i * P_i with f = `load` [E] (sums to 1) and P = mean probs [E].
    1 at perfectly balanced load; the gradient flows through P only."""
    P_mean = jnp.mean(probs.reshape(-1, probs.shape[-1]), axis=0)  # [E]
    return probs.shape[-1] * jnp.sum(jax.lax.stop_gradient(load) * P_mean)


def router_z_loss(logits):
    """ST-MoE: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def router_entropy(probs):
    return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1))


def check_router_logits(logits) -> None:
    """Raise on NaN router logits when they are concrete (eager). Under tracing the NaN is
    propagated to the block's output and losses instead (see `MoE`), never routed silently."""
    if isinstance(logits, jax.core.Tracer):
        return
    bad = int(np.isnan(np.asarray(logits)).any(-1).sum())
    if bad:
        raise FloatingPointError(
            f"MoE router produced NaN logits for {bad} token(s): the hidden states or the router "
            "kernel contain NaN/inf; check the inputs, the learning rate and the loss history."
        )


# --------------------------------------------------------------------------- expert parallelism


def check_moe_mesh(cfg: ModelConfig, mesh) -> None:
    """ConfigError unless the expert mesh axis divides num_experts (call where the mesh is set)."""
    if cfg.moe is None or mesh is None or "expert" not in mesh.axis_names:
        return
    ep, E = mesh.shape["expert"], cfg.moe.num_experts
    if E % ep:
        raise ConfigError(
            f"moe.num_experts ({E}) is not divisible by the mesh's expert axis ({ep}): choose an "
            f"expert axis size that divides {E} "
            f"(e.g. --train.mesh=expert:{math.gcd(E, ep)},data:-1)."
        )


def _ep_mesh():
    """The context mesh when it has an expert axis > 1, else None (plain path)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.shape.get("expert", 1) == 1:
        return None
    return mesh


def _ep_specs(mesh, batch: int, kernels: dict):
    """(batch spec entry, expert weight specs, tensor axis or None) for the shard_map."""
    spec = logical_to_spec(("batch",), mesh, (batch,))[0]
    t_size = mesh.shape.get("tensor", 1)
    t = "tensor" if t_size > 1 and kernels["up"].shape[-1] % t_size == 0 else None
    kspecs = {n: P("expert", None, t) for n in ("gate", "up") if n in kernels}
    kspecs["down"] = P("expert", t, None)
    return spec, kspecs, t


def _tok_axes(spec) -> tuple:
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def ep_capacity_ffn(x, dispatch, combine, kernels: dict, act, mesh):
    """Capacity dispatch with experts sharded over `expert`. x [G, S, D] -> [G, S, D].

    When the groups are split over `expert`, expert inputs [E, G, C, D] are exchanged by
    all-to-all so each shard runs its E/ep experts on everyone's tokens, and sent back. When
    they are not (e.g. batch 1 decode), every shard runs its local experts on its (replicated)
    tokens and the partial outputs are summed over `expert`.
    """
    spec, kspecs, t = _ep_specs(mesh, x.shape[0], kernels)
    exchange = "expert" in _tok_axes(spec)
    ep = mesh.shape["expert"]

    def body(x, dispatch, combine, kernels):
        E_loc = kernels["up"].shape[0]
        G, C, D = x.shape[0], dispatch.shape[-1], x.shape[-1]
        if exchange:
            h = dispatch_tokens(x, dispatch).reshape(ep, E_loc, G, C, D)  # [ep, E_loc, G, C, D]
            h = jax.lax.all_to_all(h, "expert", 0, 0)  # [ep (source), E_loc, G, C, D]
            h = h.transpose(1, 0, 2, 3, 4).reshape(E_loc, ep * G * C, D)  # [E_loc, ep*G*C, D]
            h = expert_ffn(h, kernels, act).reshape(E_loc, ep, G, C, D)
            h = jax.lax.all_to_all(h.transpose(1, 0, 2, 3, 4), "expert", 0, 0)  # [ep, E_loc, ...]
            y = combine_tokens(h.reshape(ep * E_loc, G, C, D), combine)  # [G, S, D]
        else:
            e0 = jax.lax.axis_index("expert") * E_loc
            dispatch = jax.lax.dynamic_slice_in_dim(dispatch, e0, E_loc, axis=2)  # [G,S,E_loc,C]
            combine = jax.lax.dynamic_slice_in_dim(combine, e0, E_loc, axis=2)  # [G,S,E_loc,C]
            h = dispatch_tokens(x, dispatch).reshape(E_loc, G * C, D)  # [E_loc, G*C, D]
            h = expert_ffn(h, kernels, act).reshape(E_loc, G, C, D)
            y = combine_tokens(h, combine)  # [G, S, D]
        axes = (() if exchange else ("expert",)) + ((t,) if t else ())
        return jax.lax.psum(y, axes) if axes else y

    tok = P(spec)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(tok, tok, tok, kspecs), out_specs=tok, check_vma=False
    )(x, dispatch, combine, kernels)


def ep_dropless_ffn(x, ids, weights, kernels: dict, act, mesh, **gmm):
    """Dropless with experts sharded over `expert`. x [B, T, D], ids/weights [B, T, K].

    Exchanged case: each shard sorts its token copies by expert and sends shard j the rows for
    j's experts by all-to-all. XLA:CPU has no `ragged_all_to_all`, so every destination gets a
    buffer of the worst case (all N*K rows), padded with the id E_loc (= skip); the receiver
    runs the grouped matmul and sends the rows back the same way. Otherwise as in
    `ep_capacity_ffn`: local experts on replicated tokens, then a sum over `expert`.
    """
    spec, kspecs, t = _ep_specs(mesh, x.shape[0], kernels)
    exchange = "expert" in _tok_axes(spec)
    ep = mesh.shape["expert"]

    def body(x, ids, weights, kernels):
        E_loc = kernels["up"].shape[0]
        B, T, D = x.shape
        K = ids.shape[-1]
        xf, idf, wf = x.reshape(B * T, D), ids.reshape(-1), weights.reshape(B * T, K)
        if exchange:
            A = idf.shape[0]  # N*K token copies on this shard
            order = jnp.argsort(idf, stable=True)  # [A]
            sid = idf[order]  # [A] sorted expert ids
            dest = sid // E_loc  # [A] owning shard
            count = jnp.bincount(dest, length=ep)  # [ep]
            start = jnp.cumsum(count) - count  # [ep]
            slot = dest * A + jnp.arange(A) - start[dest]  # [A] row in the send buffer
            send = jnp.zeros((ep * A, D), x.dtype).at[slot].set(xf[order // K])  # [ep*A, D]
            send_ids = jnp.full((ep * A,), E_loc, jnp.int32).at[slot].set(sid % E_loc)
            recv = jax.lax.all_to_all(send.reshape(ep, A, D), "expert", 0, 0)  # [ep, A, D]
            recv_ids = jax.lax.all_to_all(send_ids.reshape(ep, A), "expert", 0, 0)  # [ep, A]
            recv, recv_ids = recv.reshape(ep * A, D), recv_ids.reshape(-1)  # [ep*A, D], [ep*A]
            out = sorted_ffn(recv, recv_ids, E_loc, kernels, act, **gmm)  # [ep*A, D]
            back = jax.lax.all_to_all(out.reshape(ep, A, D), "expert", 0, 0).reshape(ep * A, D)
            y = jnp.zeros((A, D), back.dtype).at[order].set(back[slot])  # [A, D] token order
            y = jnp.einsum("nk,nkd->nd", wf.astype(y.dtype), y.reshape(B * T, K, D))
        else:
            e0 = jax.lax.axis_index("expert") * E_loc
            local = (idf >= e0) & (idf < e0 + E_loc)
            lid = jnp.where(local, idf - e0, E_loc).reshape(B * T, K)  # E_loc = not here
            y = dropless_ffn(xf, lid, wf, kernels, act, E_loc, **gmm)  # [N, D]
        y = y.reshape(B, T, D)
        axes = (() if exchange else ("expert",)) + ((t,) if t else ())
        return jax.lax.psum(y, axes) if axes else y

    tok = P(spec)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(tok, tok, tok, kspecs), out_specs=tok, check_vma=False
    )(x, ids, weights, kernels)


# --------------------------------------------------------------------------- modules


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
