"""Optimizers that update the LoRA factors only."""

from __future__ import annotations

import jax
import optax

from lm_jax.adapters.tree import is_lora_path


def lora_optimizer(tx: optax.GradientTransformation, params=None) -> optax.GradientTransformation:
    """`tx` on the LoRA factors only; frozen leaves get zero updates and no optimizer state.

    (optax.multi_transform masks the frozen leaves out of `tx`'s state: they appear as empty
    `MaskedNode`s, so Adam keeps moments for the adapters only.) `params` is accepted for
    symmetry; the labels are computed from whatever tree `init` receives.
    """
    del params

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "lora" if is_lora_path(p) else "frozen", tree
        )

    return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)
