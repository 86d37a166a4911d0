"""Expert parallelism: the experts sharded over the mesh's `expert` axis, tokens exchanged by
all-to-all (capacity and dropless dispatch), and the mesh check."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.nn.moe_dispatch import (
    combine_tokens,
    dispatch_tokens,
    dropless_ffn,
    expert_ffn,
    sorted_ffn,
)
from lm_jax.sharding import logical_to_spec


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
