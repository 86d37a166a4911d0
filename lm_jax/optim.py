"""Optimizers: AdamW or Adafactor with warmup + cosine decay, clipping, trainable-parameter
masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lm_jax.configs.base import ConfigError
from lm_jax.configs.train import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then to `min_lr_ratio * learning_rate` at
    `lr_decay_steps`: by a cosine, or (wsd) held at the peak and cooled down over the last
    `cooldown_fraction` of the steps, linearly or as 1 - sqrt(progress); `constant` holds it."""
    decay_steps = cfg.lr_decay_steps or cfg.steps
    warmup = min(cfg.warmup_steps, decay_steps)
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if cfg.lr_schedule == "constant":
        return optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    cooldown = max(round(cfg.cooldown_fraction * decay_steps), 1)
    cool_start = max(decay_steps - cooldown, warmup)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / (warmup + 1)  # nanoGPT: lr * (it + 1) / (warmup_iters + 1)
        if cfg.lr_schedule == "wsd":
            t = jnp.clip((step - cool_start) / jnp.maximum(decay_steps - cool_start, 1), 0.0, 1.0)
            down = 1.0 - (jnp.sqrt(t) if cfg.cooldown_shape == "1-sqrt" else t)
            after = floor + down * (peak - floor)
        else:
            ratio = jnp.clip((step - warmup) / jnp.maximum(decay_steps - warmup, 1), 0.0, 1.0)
            after = floor + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (peak - floor)
        return jnp.where(step < warmup, warm, after)

    return schedule


def policy_lr_schedule(lr: float, steps: int, kind: str = "constant", min_lr_ratio: float = 0.1):
    """Learning rate of a policy tuner (experiments/align.py): `lr` throughout, or cosine from
    `lr` to `lr * min_lr_ratio` at `steps` (optax.cosine_decay_schedule)."""
    if lr <= 0 or steps < 1:
        raise ConfigError(f"need lr > 0 and steps >= 1, got lr={lr}, steps={steps}.")
    if kind == "constant":
        return lr
    if kind != "cosine":
        raise ConfigError(f"unknown lr schedule {kind!r}; use constant or cosine.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio} (e.g. 0.1).")
    return optax.cosine_decay_schedule(lr, steps, alpha=min_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings) only, not on norm scales and biases."""

    def decays(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        return x.ndim >= 2 and name not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig, trainable=None) -> optax.GradientTransformation:
    """AdamW or Adafactor (+clipping) on trainable leaves; frozen leaves (mask False) get no
    optimizer state."""
    if cfg.optimizer == "adafactor":
        update = optax.adafactor(
            learning_rate_schedule(cfg),
            multiply_by_parameter_scale=True,
            weight_decay_rate=cfg.weight_decay or None,
            weight_decay_mask=decay_mask,
        )
    else:
        update = optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        update,
    )
    if trainable is None:
        return tx
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda t: "train" if t else "freeze",
        trainable(params) if callable(trainable) else trainable,
    )
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
