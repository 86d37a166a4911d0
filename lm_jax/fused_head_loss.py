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
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
    return jnp.einsum(spec, h.astype(cdt), w.astype(cdt)).astype(jnp.float32)


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
    dw_spec = "bcv,bcd->vd" if vocab_major else "bcd,bcv->dv"
    dh_spec = "bcv,vd->bcd" if vocab_major else "bcv,dv->bcd"
    use_z = z_loss != 0.0

    def grads(g, h):  # d logits [B, c, V] -> d hidden [B, c, D], d weight
        g = g.astype(cdt)
        dh = jnp.einsum(dh_spec, g, w, preferred_element_type=jnp.float32)
        ops = (g, h.astype(cdt)) if vocab_major else (h.astype(cdt), g)
        return dh, jnp.einsum(dw_spec, *ops, preferred_element_type=jnp.float32)

    def step(carry, xs):
        nll_acc, z_acc, dw_nll, dw_z = carry
        h, t, m = xs
        logits = _logits(h, w, vocab_major, cdt)
        log_z, tgt = _stats(logits, t)
        p = jnp.exp(logits - log_z[..., None])  # softmax [B, c, V]
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
        dh_nll, dw = grads(jnp.where(hit, p - 1.0, p) * m[..., None], h)
        nll_acc = nll_acc + jnp.sum((log_z - tgt) * m)
        dw_nll = dw_nll + dw
        if use_z:
            dh_z, dw = grads(p * (2.0 * z_loss * log_z * m)[..., None], h)
            z_acc, dw_z = z_acc + jnp.sum(z_loss * jnp.square(log_z) * m), dw_z + dw
        else:
            dh_z = jnp.zeros_like(dh_nll)
        return (nll_acc, z_acc, dw_nll, dw_z), (dh_nll, dh_z)

    zero = jnp.zeros((), jnp.float32)
    dw0 = jnp.zeros(weight.shape, jnp.float32)
    (nll, z, dw_nll, dw_z), (dh_nll, dh_z) = jax.lax.scan(
        step, (zero, zero, dw0, dw0), (hs, ts, ms)
    )

    def merge(x):  # [n, B, c, D] -> [B, T, D]
        return jnp.moveaxis(x, 0, 1).reshape(B, Tp, D)[:, :T]

    protos = (jnp.zeros((), hidden.dtype), jnp.zeros((), weight.dtype))  # cotangent dtypes
    res = (merge(dh_nll), merge(dh_z), dw_nll, dw_z, *protos)
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
