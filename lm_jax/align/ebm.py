"""The GDC energy-based target P(x) = a(x) b(x) exp(lambda . phi(x)), all in log space.

log P = log a + log b + lambda . phi_dist, with log b = sum over pointwise features of
log phi (0 where phi = 1, -inf where phi = 0: never NaN). p = P / Z is the I-projection of a
onto {c : E_c[phi] = mu_bar} (Csiszar; Khalifa et al. 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from lm_jax.align.features import Constraint


@flax.struct.dataclass
class EBM:
    """lam [F] (0 on pointwise features); `pointwise` (static) marks the b(x) features."""

    lam: jax.Array
    pointwise: tuple[bool, ...] = flax.struct.field(pytree_node=False)

    @property
    def num_features(self) -> int:
        return len(self.pointwise)

    def log_b(self, phi: jax.Array) -> jax.Array:
        """[B, F] -> [B]: sum of log phi over pointwise features (0 or -inf for binary phi)."""
        point = jnp.asarray(self.pointwise, bool)
        logs = jnp.where(point, jnp.log(jnp.clip(phi, 0.0, 1.0)), 0.0)  # [B, F]
        return jnp.sum(logs, axis=-1)

    def energy(self, phi: jax.Array) -> jax.Array:
        """lambda . phi over distributional features: [B, F] -> [B]."""
        point = jnp.asarray(self.pointwise, bool)
        lam = jnp.where(point, 0.0, self.lam.astype(jnp.float32))
        return phi @ lam if phi.shape[-1] else jnp.zeros(phi.shape[:-1], jnp.float32)

    def log_score(self, log_a: jax.Array, phi: jax.Array) -> jax.Array:
        """log P(x) = log a(x) + log b(x) + lambda . phi(x): [B], [B, F] -> [B]."""
        return log_a + self.log_b(phi) + self.energy(phi)

    def replace_lam(self, lam) -> EBM:
        return self.replace(lam=jnp.asarray(lam, jnp.float32))


def make_ebm(constraints: Sequence[Constraint], lam=None) -> EBM:
    """An EBM with lambda = 0 (fit it with `moments.fit_lambda`) or the given lambda."""
    point = tuple(c.pointwise for c in constraints)
    lam = jnp.zeros(len(point), jnp.float32) if lam is None else jnp.asarray(lam, jnp.float32)
    return EBM(lam=lam, pointwise=point)
