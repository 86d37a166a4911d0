"""Contrastive image-text losses (float32): CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Inputs are L2-normalised embeddings [B, E] where row i of images and texts is a positive pair.

Data parallelism: the losses are over the GLOBAL batch. Under `jax.jit` with the embeddings
sharded over the batch, `clip_loss` / `sigmoid_loss` see global arrays and XLA gathers what the
[B, B] logits need, so they equal the single-device loss by construction. `sigmoid_loss_chunked`
is SigLIP's memory-light form for `shard_map`: every device keeps its images and passes its
text chunk around the ring (`ppermute`), never holding more than [B/n, B/n] logits;
`clip_loss_gathered` all-gathers the texts/images inside `shard_map` and psums the loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def contrastive_logits(image_emb, text_emb, scale, bias=0.0):
    """logits_per_image [B_i, B_t] = scale * image . text + bias (float32)."""
    img = image_emb.astype(jnp.float32)
    txt = text_emb.astype(jnp.float32)
    return scale * (img @ txt.T) + bias


def clip_loss(image_emb, text_emb, scale) -> jax.Array:
    """CLIP: mean of the image->text and text->image cross-entropies with targets i <-> i."""
    logits = contrastive_logits(image_emb, text_emb, scale)  # [B, B]
    diag = jnp.diagonal(logits)
    li = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    lt = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    return 0.5 * (li + lt)


def sigmoid_loss(image_emb, text_emb, scale, bias) -> jax.Array:
    """SigLIP: -sum_ij log sigmoid(z_ij * (scale x_i.y_j + bias)) / B, z = +1 on the diagonal."""
    logits = contrastive_logits(image_emb, text_emb, scale, bias)
    B = logits.shape[0]
    z = 2.0 * jnp.eye(B, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / B


def _axis_size(axis_name) -> int:
    return jax.lax.psum(1, axis_name)


def sigmoid_loss_chunked(image_emb, text_emb, scale, bias, *, axis_name) -> jax.Array:
    """Inside `shard_map` over `axis_name`: SigLIP's chunked exchange. Each device scores its
    local images against every text chunk as the chunks travel the ring; returns the global
    loss (same value on every device)."""
    n = _axis_size(axis_name)
    b = image_emb.shape[0]
    img = image_emb.astype(jnp.float32)
    perm = [(j, (j + 1) % n) for j in range(n)]

    def chunk_loss(txt, positive: bool):
        logits = scale * (img @ txt.T) + bias  # [b, b]
        z = 2.0 * jnp.eye(b, dtype=jnp.float32) - 1.0 if positive else -jnp.ones((b, b))
        return -jnp.sum(jax.nn.log_sigmoid(z * logits))

    txt = text_emb.astype(jnp.float32)
    total = chunk_loss(txt, True)
    for _ in range(n - 1):  # static: n - 1 ring steps
        txt = jax.lax.ppermute(txt, axis_name, perm)
        total = total + chunk_loss(txt, False)
    return jax.lax.psum(total, axis_name) / (b * n)


def clip_loss_gathered(image_emb, text_emb, scale, *, axis_name) -> jax.Array:
    """Inside `shard_map`: local rows against all-gathered columns, both directions; global mean."""
    n = _axis_size(axis_name)
    b = image_emb.shape[0]
    idx = jax.lax.axis_index(axis_name)
    img = image_emb.astype(jnp.float32)
    txt = text_emb.astype(jnp.float32)
    all_txt = jax.lax.all_gather(txt, axis_name, tiled=True)  # [B, E]
    all_img = jax.lax.all_gather(img, axis_name, tiled=True)
    cols = idx * b + jnp.arange(b)

    def ce(rows, others):
        lg = scale * (rows @ others.T)  # [b, B]
        pos = jnp.take_along_axis(lg, cols[:, None], axis=1)[:, 0]
        return jnp.sum(jax.nn.logsumexp(lg, axis=1) - pos)

    local = 0.5 * (ce(img, all_txt) + ce(txt, all_img))
    return jax.lax.psum(local, axis_name) / (b * n)


def sharded_contrastive_loss(mesh, kind: str = "siglip", axis_name=("data",)):
    """A function (image_emb, text_emb, scale, bias) -> loss running the exchange under
    `jax.shard_map` with the batch split over `axis_name` (a mesh axis or tuple of axes)."""
    axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    spec = P(axes)
    if kind == "siglip":
        inner = functools.partial(sigmoid_loss_chunked, axis_name=axes)
    elif kind == "clip":
        inner = lambda i, t, s, b: clip_loss_gathered(i, t, s, axis_name=axes)  # noqa: E731
    else:
        raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}.")
    return jax.shard_map(
        inner, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P(), check_vma=False
    )


def contrastive_loss(out: dict, kind: str) -> jax.Array:
    """Loss of a `TwoTowers` output dict (`image_embeds`, `text_embeds`, `logit_scale/bias`)."""
    if kind == "clip":
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    if kind == "siglip":
        return sigmoid_loss(
            out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"]
        )
    raise ValueError(f"loss kind must be 'clip' or 'siglip', got {kind!r}.")
