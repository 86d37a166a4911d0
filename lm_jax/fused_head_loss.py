"""LM head + cross-entropy in chunks of positions, with the gradients made in the forward pass.

`fused_head_cross_entropy(hidden, weight, ...)` returns what `losses.cross_entropy(hidden @ W)`
returns (summed NLL, summed z-loss, token count) without ever holding the [B, T, V] logits.
Each chunk of `chunk` positions makes its [B, chunk, V] logits once. In the same pass it makes
their gradients, (softmax - onehot) and 2 z log Z softmax, and contracts them at once into
d hidden [B, chunk, D] and d weight [D, V]. The backward pass only scales those by the
incoming cotangents. So the head costs what it costs unchunked (one logits matmul, two
gradient matmuls), not the extra logits matmul that rematerialising each chunk
(`losses.chunked_cross_entropy`) pays. This is the "fused linear cross-entropy" of Liger
Kernel and the approach of Wijmans et al. 2024 ("Cut your losses").

Without differentiation (evaluation) only the sums are computed. `weight` is the untied head's
kernel [D, V], or with `vocab_major` the tied embedding table [V, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(hidden, targets, mask, chunk):
    """Pad T to a multiple of `chunk` (masked) and split: [n, B, c, ...] each."""
    B, T, _ = hidden.shape
    pad = -T % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (T + pad) // chunk

    def split(x):
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    return split(hidden), split(targets), split(mask), T + pad


def _logits(h, w, vocab_major, cdt):
    """[B, c, D] -> [B, c, V] float32, as one 2-D matmul (XLA:CPU runs [B c, D] @ [D, V]
    markedly faster than the same dot on a 3-D operand)."""
    B, c, D = h.shape
    spec = "nd,vd->nv" if vocab_major else "nd,dv->nv"
    out = jnp.einsum(spec, h.reshape(B * c, D).astype(cdt), w.astype(cdt))
    return out.astype(jnp.float32).reshape(B, c, -1)


def _stats(logits, t):
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, c]
    tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return log_z, tgt


def _sums(hidden, weight, targets, mask, z_loss, chunk, vocab_major, cdt):
    hs, ts, ms, _ = _chunks(hidden, targets, mask, chunk)

    def step(carry, xs):
        h, t, m = xs
        log_z, tgt = _stats(_logits(h, weight, vocab_major, cdt), t)
        nll = jnp.sum((log_z - tgt) * m)
        return (carry[0] + nll, carry[1] + jnp.sum(z_loss * jnp.square(log_z) * m)), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(step, (zero, zero), (hs, ts, ms))
    return nll, z, jnp.sum(mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(hidden, weight, targets, mask, z_loss, chunk, vocab_major, cdt):
    return _sums(hidden, weight, targets, mask, z_loss, chunk, vocab_major, cdt)


def _fused_fwd(hidden, weight, targets, mask, z_loss, chunk, vocab_major, cdt):
    B, T, D = hidden.shape
    hs, ts, ms, Tp = _chunks(hidden, targets, mask, chunk)
    w = weight.astype(cdt)
    dw_spec = "nv,nd->vd" if vocab_major else "nd,nv->dv"
    dh_spec = "nv,vd->nd" if vocab_major else "nv,dv->nd"
    use_z = z_loss != 0.0

    def grads(g, h):  # d logits [B, c, V] -> d hidden [B, c, D], d weight; 2-D matmuls
        g2 = g.reshape(-1, g.shape[-1]).astype(cdt)  # [B c, V]
        h2 = h.reshape(-1, h.shape[-1]).astype(cdt)  # [B c, D]
        dh = jnp.einsum(dh_spec, g2, w, preferred_element_type=jnp.float32).reshape(h.shape)
        ops = (g2, h2) if vocab_major else (h2, g2)
        return dh, jnp.einsum(dw_spec, *ops, preferred_element_type=jnp.float32)

    def step(carry, xs):
        h, t, m = xs
        logits = _logits(h, w, vocab_major, cdt)
        log_z, tgt = _stats(logits, t)
        p = jnp.exp(logits - log_z[..., None])  # softmax [B, c, V]
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
        dh_nll, dw = grads(jnp.where(hit, p - 1.0, p) * m[..., None], h)
        carry = {**carry, "nll": carry["nll"] + jnp.sum((log_z - tgt) * m)}
        carry["dw_nll"] = carry["dw_nll"] + dw
        if not use_z:
            return carry, (dh_nll,)
        dh_z, dw = grads(p * (2.0 * z_loss * log_z * m)[..., None], h)
        carry["z"] = carry["z"] + jnp.sum(z_loss * jnp.square(log_z) * m)
        carry["dw_z"] = carry["dw_z"] + dw
        return carry, (dh_nll, dh_z)

    zero = jnp.zeros((), jnp.float32)
    init = {"nll": zero, "dw_nll": jnp.zeros(weight.shape, jnp.float32)}
    if use_z:
        init.update(z=zero, dw_z=jnp.zeros(weight.shape, jnp.float32))
    carry, dhs = jax.lax.scan(step, init, (hs, ts, ms))
    nll, z = carry["nll"], carry.get("z", zero)
    dw_nll = carry["dw_nll"]
    dw_z = carry.get("dw_z", jnp.zeros((), jnp.float32))
    dh_nll = dhs[0]
    dh_z = dhs[1] if use_z else jnp.zeros((1, 1, 1, 1), jnp.float32)

    def merge(x):  # [n, B, c, D] -> [B, T, D]
        return jnp.moveaxis(x, 0, 1).reshape(B, Tp, D)[:, :T]

    protos = (jnp.zeros((), hidden.dtype), jnp.zeros((), weight.dtype))  # cotangent dtypes
    res = (merge(dh_nll), merge(dh_z) if use_z else dh_z, dw_nll, dw_z, *protos)
    return (nll, z, jnp.sum(mask)), res


def _fused_bwd(z_loss, chunk, vocab_major, cdt, res, cts):
    dh_nll, dh_z, dw_nll, dw_z, h_proto, w_proto = res
    g_nll, g_z, _ = cts
    dh, dw = g_nll * dh_nll, g_nll * dw_nll
    if z_loss != 0.0:
        dh, dw = dh + g_z * dh_z, dw + g_z * dw_z
    return dh.astype(h_proto.dtype), dw.astype(w_proto.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_head_cross_entropy(
    hidden: jax.Array,  # [B, T, D] final-norm activations
    weight: jax.Array,  # [D, V] head kernel, or [V, D] tied table with vocab_major
    targets: jax.Array,  # [B, T] int
    mask: jax.Array | None,  # [B, T] 1 = counted
    z_loss: float,
    chunk: int,
    *,
    vocab_major: bool,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed NLL, summed z-loss, token count) float32 of the head hidden @ weight, `chunk`
    positions at a time; gradients for hidden and weight are made in the forward pass."""
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return _fused(hidden, weight, targets, mask, float(z_loss), chunk, vocab_major, compute_dtype)
