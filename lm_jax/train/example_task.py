"""What the tasks over a fixed list of examples share (sequence labelling, seq2seq): AdamW, the
train state initialised straight into its shardings, one jitted and donated step over batches
sharded on the mesh's data axes, and batches that are a function of the step index alone.

Epoch e's examples are permuted with `default_rng([seed, e])`, sorted by length inside pools of
`pool_batches` batches, cut into batches, and the batches shuffled (`epoch_batches`), so nothing
but the train state needs saving to resume exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lm_jax.configs.train import TrainConfig
from lm_jax.errors import DataSourceError
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, params_shardings
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash
from lm_jax.train.state import TrainState, opt_state_shardings
from lm_jax.train.step import apply_update


def epoch_batches(lengths: np.ndarray, batch_size: int, pool_batches: int, seed: int, epoch: int):
    """Example indices of each batch of epoch `epoch` (module docstring); the count never varies."""
    rng = np.random.default_rng([seed, epoch])
    order, pool, batches = rng.permutation(len(lengths)), batch_size * pool_batches, []
    for s in range(0, len(order), pool):
        chunk = order[s : s + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def optimizer_step(loss_fn: Callable, tx, train_cfg: TrainConfig):
    """(state, batch, rng) -> (state, metrics): grad of `loss_fn(params, batch, rng)` -> (loss,
    metrics), one AdamW update with the non-finite policy; the rng folded with the step."""

    def step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        grads, m = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng)
        new, gnorm, finite = apply_update(state, grads, m["loss"], tx=tx, train_cfg=train_cfg)
        return new, {**m, "grad_norm": gnorm, "finite": finite}

    return step


class ExampleTask(Task):
    """Subclasses call `setup` (the boxed abstract params, `loss_fn(params, batch, rng)`, the
    batch keys, example lengths, ...) and give `init_params(rng, given)` (unboxed params,
    traced) and `collate(indices) -> host batch`."""

    def setup(self, boxed_params, loss_fn: Callable, batch_keys: Sequence[str], lengths,
              batch_size: int, pool_batches: int, train_cfg: TrainConfig, mesh):  # fmt: skip
        if len(lengths) == 0:
            raise DataSourceError("no training examples")
        self.train_cfg, self.mesh = train_cfg, mesh
        self.lengths = np.asarray(lengths)
        self.batch_size, self.pool_batches = batch_size, pool_batches
        self.epoch_steps = len(epoch_batches(self.lengths, batch_size, pool_batches, 0, 0))
        self.tx = make_optimizer(train_cfg)
        self.rng = jax.random.key(train_cfg.seed + 1)
        p_sh = params_shardings(boxed_params, mesh)
        params = nn.unbox(boxed_params)
        o_abs = jax.eval_shape(self.tx.init, params)
        rep = NamedSharding(mesh, PartitionSpec())
        self.shardings = TrainState(rep, p_sh, opt_state_shardings(o_abs, params, p_sh, mesh), rep)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        self.abstract = TrainState(scalar, params, o_abs, scalar)
        b_sh = batch_sharding(mesh, 2, batch_size)
        self._step = jax.jit(
            optimizer_step(loss_fn, self.tx, train_cfg),
            in_shardings=(self.shardings, {k: b_sh for k in batch_keys}, None),
            out_shardings=(self.shardings, None), donate_argnums=(0,),
        )  # fmt: skip
        self._epoch: tuple[int, list] | None = None
        self._batch_ids = np.zeros(0, np.int64)

    init_given = None  # a tree passed to init_params as a jit argument (e.g. pretrained weights)

    def init_params(self, rng, given):
        """Fresh unboxed params (traced under jit); `given` = `self.init_given`."""
        raise NotImplementedError

    def collate(self, indices) -> dict:
        raise NotImplementedError

    def steps_for(self, epochs: float) -> int:
        return max(1, int(round(epochs * self.epoch_steps)))

    def init_state(self):
        tx = self.tx

        def make(rng, given):
            p = self.init_params(rng, given)
            z = jnp.zeros((), jnp.int32)
            return TrainState(z, p, tx.init(p), z)

        rng = jax.random.key(self.train_cfg.seed)
        with jax.set_mesh(self.mesh):
            return jax.jit(make, out_shardings=self.shardings)(rng, self.init_given)

    def abstract_state(self):
        return self.abstract, self.shardings

    def batch(self, step: int) -> dict:
        epoch, j = divmod(step, self.epoch_steps)
        if self._epoch is None or self._epoch[0] != epoch:
            order = epoch_batches(self.lengths, self.batch_size, self.pool_batches,
                                  self.train_cfg.seed, epoch)  # fmt: skip
            self._epoch = (epoch, order)
        self._batch_ids = self._epoch[1][j]
        return self.collate(self._batch_ids)

    def train_step(self, state, step: int):
        batch = self.batch(step)
        with jax.set_mesh(self.mesh):
            return self._step(state, batch, self.rng)

    def step_record(self, step: int, metrics: dict, state) -> dict:
        return {
            "step": step, "loss_hex": float(metrics["loss"]).hex(),
            "batch_hash": hashlib.sha256(np.asarray(self._batch_ids).tobytes()).hexdigest()[:16],
            "params_hash": params_hash(state.params),
        }  # fmt: skip
