"""Pure, jitted train and eval steps for next-token prediction.

The pieces every gradient step shares (`accumulate_grads` over microbatches, `mask_frozen` for
LoRA, `apply_update` with the non-finite policy) are used by the preference step too
(`lm_jax.train.preference_step`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lm_jax.configs.base import ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.losses import chunked_cross_entropy, cross_entropy
from lm_jax.nn.transformer import Transformer, head_logits_fn
from lm_jax.train.state import TrainState


def _aux_sums(aux) -> tuple[jax.Array, dict]:
    """Sum sown `moe_loss` leaves; average sown `moe_metrics` over layers."""
    loss = jnp.zeros((), jnp.float32)
    metrics: dict = {}
    if not aux:
        return loss, metrics
    for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if "moe_loss" in keys:
            loss = loss + jnp.sum(leaf.astype(jnp.float32))
        elif "moe_metrics" in keys:
            name = "moe/" + keys[-1]
            val = jnp.mean(leaf.astype(jnp.float32), axis=0)  # mean over scanned layers
            metrics[name] = metrics.get(name, 0) + val
    return loss, metrics


def loss_and_metrics(params, batch, model_cfg: ModelConfig, train_cfg: TrainConfig, rng, train):
    """Summed loss over the batch (CE + z-loss + MoE aux) and float metrics."""
    model = Transformer(model_cfg)
    chunk = train_cfg.loss_chunk
    out, variables = model.apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        deterministic=not train,
        skip_head=chunk > 0,
        rngs={"dropout": rng},
        mutable=["aux"],
    )
    targets, mask = batch["targets"], batch["loss_mask"]
    if chunk > 0:  # out: final-norm activations [B, T, D]; logits [B, chunk, V] at a time
        logits_fn = head_logits_fn(params, model_cfg)
        nll, z, count = chunked_cross_entropy(
            out, logits_fn, targets, mask, train_cfg.z_loss, chunk
        )
    else:  # out: logits [B, T, V]
        nll, z, count = cross_entropy(out, targets, mask, train_cfg.z_loss)
    moe_loss, moe_metrics = _aux_sums(variables.get("aux"))
    # MoE losses are per-token means: scale by the token count so the total stays a sum.
    total = nll + z + moe_loss * count
    return total, {"nll_sum": nll, "z_sum": z, "tokens": count, **moe_metrics}


def _split_micro(batch, n: int):
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def accumulate_grads(grad_fn, params, batch, rng, n: int):
    """(gradients, metrics), each summed over `n` microbatches of `batch` (split along the
    leading axis of every leaf); `grad_fn(params, microbatch, rng) -> (grads, metrics)` gets
    `fold_in(rng, i)` for microbatch i, or `rng` itself when n == 1 (then no accumulator
    buffers: they cost a full pass over the parameters)."""
    if n == 1:
        return grad_fn(params, batch, rng)

    def micro(carry, xs):
        g_acc, m_acc = carry
        mb, i = xs
        g, m = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

    micro_batches = _split_micro(batch, n)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    g_shape = jax.eval_shape(lambda: grad_fn(params, first, rng))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), g_shape)
    (grads, m), _ = jax.lax.scan(micro, zeros, (micro_batches, jnp.arange(n)))
    return grads, m


def mask_frozen(grads, params, trainable):
    """Zero gradients on frozen leaves (so XLA drops their computation); `trainable`: None (all
    train), a tree of bools or a function params -> tree (e.g. LoRA's `trainable_mask`)."""
    if trainable is None:
        return grads
    mask = trainable(params) if callable(trainable) else trainable
    return jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, mask)


def apply_update(state: TrainState, grads, loss, *, tx, train_cfg: TrainConfig):
    """(new state, grad_norm, finite): one optimizer update with the non-finite policy. With
    `nonfinite="skip"` a non-finite loss or gradient drops the update (parameters and optimizer
    state unchanged to the bit) and counts it in `skipped`; the loop halts on `halt`."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, skipped=state.skipped)
    if train_cfg.nonfinite == "skip":
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa: E731
        new = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
    return new, grad_norm, finite


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tx: optax.GradientTransformation,
    inject_nonfinite: bool = False,
    trainable=None,
) -> tuple[TrainState, dict]:
    """One optimizer step over `grad_accum` microbatches; gradients of the token-mean loss.

    Non-finite loss or gradients: with `nonfinite="skip"` the update is dropped (parameters
    unchanged to the bit) and counted; the loop halts on `halt` or too many skips.
    """
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.grad(loss_and_metrics, has_aux=True)
    n = train_cfg.grad_accum

    def micro_grad(params, mb, r):
        return grad_fn(params, mb, model_cfg, train_cfg, r, True)

    grads, m = accumulate_grads(micro_grad, state.params, batch, rng, n)
    grads = mask_frozen(grads, state.params, trainable)
    tokens = jnp.maximum(m["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = (m["nll_sum"] + m["z_sum"]) / tokens
    if inject_nonfinite:
        loss = loss * jnp.nan
        grads = jax.tree.map(lambda g: g * jnp.nan, grads)
    new, grad_norm, finite = apply_update(state, grads, loss, tx=tx, train_cfg=train_cfg)
    metrics = {
        "loss": m["nll_sum"] / tokens,
        "total_loss": loss,
        "grad_norm": grad_norm,
        "tokens": m["tokens"],
        "finite": finite,
        **{k: v / n for k, v in m.items() if k.startswith("moe/")},
    }
    return new, metrics


def eval_step(params, batch, *, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """Summed NLL and token count of one batch (divide once after the whole pass)."""
    _, m = loss_and_metrics(params, batch, model_cfg, train_cfg, jax.random.key(0), False)
    return {"nll_sum": m["nll_sum"], "tokens": m["tokens"]}


def jit_train_step(
    model_cfg, train_cfg, tx, state_sh, batch_sh, inject_nonfinite=False, trainable=None
):
    """`trainable`: tree of bools or a function params -> tree (e.g. LoRA's `trainable_mask`);
    gradients of frozen leaves are then never computed and `grad_norm` covers trainable ones."""
    fn = functools.partial(
        train_step,
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        tx=tx,
        inject_nonfinite=inject_nonfinite,
        trainable=trainable,
    )
    return jax.jit(
        fn,
        in_shardings=(state_sh, batch_sh, None),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


def jit_eval_step(model_cfg, train_cfg, params_sh, batch_sh):
    fn = functools.partial(eval_step, model_cfg=model_cfg, train_cfg=train_cfg)
    return jax.jit(fn, in_shardings=(params_sh, batch_sh), out_shardings=None)
