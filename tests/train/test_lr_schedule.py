"""`learning_rate_schedule` against closed forms: nanoGPT's get_lr (cosine), and
warmup-stable-decay with linear and 1 - sqrt cooldowns (Hägele et al. 2024)."""

import math

import numpy as np
import pytest

from lm_jax.configs.base import ConfigError
from lm_jax.configs.train import TrainConfig
from lm_jax.optim import learning_rate_schedule


def nanogpt_get_lr(it, lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000):
    """karpathy/nanoGPT train.py, verbatim logic."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (lr - min_lr)


def test_cosine_is_nanogpts_get_lr():
    cfg = TrainConfig(steps=2000, learning_rate=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    sched = learning_rate_schedule(cfg)
    for it in (0, 1, 50, 99, 100, 101, 700, 1500, 1999, 2000, 2500):
        np.testing.assert_allclose(float(sched(it)), nanogpt_get_lr(it), rtol=1e-6)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_the_peak_then_cools_to_the_floor(shape):
    cfg = TrainConfig(
        steps=1000, learning_rate=2e-3, warmup_steps=50, min_lr_ratio=0.0,
        lr_schedule="wsd", cooldown_fraction=0.2, cooldown_shape=shape,
    )  # fmt: skip
    sched = learning_rate_schedule(cfg)
    np.testing.assert_allclose(float(sched(0)), 2e-3 / 51, rtol=1e-6)
    for it in (50, 300, 799, 800):
        np.testing.assert_allclose(float(sched(it)), 2e-3, rtol=1e-6)
    for it in (850, 900, 950):
        t = (it - 800) / 200
        down = 1 - (math.sqrt(t) if shape == "1-sqrt" else t)
        np.testing.assert_allclose(float(sched(it)), 2e-3 * down, rtol=1e-5)
    assert float(sched(1000)) == 0.0 and float(sched(1200)) == 0.0


def test_a_longer_wsd_run_repeats_the_shorter_one_until_its_cooldown():
    """The point of WSD: extend the stable phase and branch a cooldown at any checkpoint."""
    short = learning_rate_schedule(TrainConfig(steps=1000, lr_schedule="wsd", warmup_steps=10))
    long = learning_rate_schedule(TrainConfig(steps=3000, lr_schedule="wsd", warmup_steps=10))
    steps = np.arange(0, 800)
    np.testing.assert_array_equal(np.asarray(short(steps)), np.asarray(long(steps)))
    assert float(short(900)) < float(long(900))


def test_bad_cooldown_fraction_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cooldown_fraction must be in \(0, 1\]"):
        TrainConfig(lr_schedule="wsd", cooldown_fraction=0.0)


def test_adafactor_first_step_is_relative_to_the_parameter_scale():
    """Adafactor's first update in closed form (Shazeer & Stern 2018; an unfactored matrix, so
    v = g^2): -lr * RMS(W) * sign(g), while AdamW's is -lr * sign(g) whatever W's scale."""
    import jax.numpy as jnp

    from lm_jax.optim import make_optimizer

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0.0, 3.0, (4, 6)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    params, grads = {"kernel": w}, {"kernel": g}
    base = dict(steps=10, learning_rate=0.01, warmup_steps=0, weight_decay=0.0, grad_clip=0.0,
                lr_schedule="constant")  # fmt: skip
    for name, want in [
        ("adafactor", -0.01 * float(jnp.sqrt(jnp.mean(w**2))) * np.sign(g)),
        ("adamw", -0.01 * np.sign(g)),
    ]:
        tx = make_optimizer(TrainConfig(optimizer=name, **base))
        upd, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(upd["kernel"], want, rtol=1e-4, err_msg=name)
