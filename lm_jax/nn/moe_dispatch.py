"""Mixture-of-experts dispatch (pure): capacity by index, einsum dispatch/combine, and dropless
(`ragged_dot`, or block-padded on CPU with a fixed-layout fast path when the loads fit)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lm_jax.nn.moe_routing import capacity_slots


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
