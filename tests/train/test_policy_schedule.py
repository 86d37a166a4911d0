"""The policy tuner's learning rate (experiments/align.py --lr_schedule) against the closed form."""

import math

import numpy as np
import pytest

from lm_jax.configs import ConfigError
from lm_jax.optim import policy_lr_schedule


def test_cosine_follows_the_closed_form_and_ends_at_the_ratio():
    sched = policy_lr_schedule(1e-3, 100, "cosine", 0.1)
    for t in (0, 25, 50, 100, 150):
        c = 0.5 * (1 + math.cos(math.pi * min(t, 100) / 100))
        np.testing.assert_allclose(float(sched(t)), 1e-3 * (0.1 + 0.9 * c), rtol=1e-6)
    assert policy_lr_schedule(1e-3, 100) == 1e-3  # constant


@pytest.mark.parametrize(
    "args, match",
    [
        ((1e-3, 100, "cosine", -0.5), "min_lr_ratio must be in"),
        ((1e-3, 100, "cosine", 2.0), "min_lr_ratio must be in"),
        ((0.0, 100), "lr > 0"),
        ((1e-3, 0), "steps >= 1"),
        ((1e-3, 100, "linear"), "unknown lr schedule"),
    ],
)
def test_bad_schedules_are_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        policy_lr_schedule(*args)
