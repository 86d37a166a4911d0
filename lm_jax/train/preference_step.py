"""Preference optimisation's numbers: the policy's pair log-probs (through the one scorer), the
batch loss, the jitted train step, and host-side scoring of whole pair sets.

`pair_logps` runs `lm_jax.scoring.score` once over the [2B, T] rows of a batch (chosen rows,
then rejected rows) and splits the masked sums and counts into a `PairLogps`; `batch_loss`
feeds it, with the batch's cached reference log-probs, to `lm_jax.losses_preference`. The train
step is the next-token step's skeleton (`lm_jax.train.step`: microbatches, frozen LoRA leaves,
the non-finite policy) around that loss. `score_pairs` scores every pair of a set with a
host-side `Scorer`: the reference log-probs before training and the policy's at evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm_jax.configs.base import ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.losses_preference import PairLogps, preference_loss
from lm_jax.scoring import Scorer, score
from lm_jax.sharding import batch_sharding
from lm_jax.train.preference_data import EncodedPair, PreferenceConfig
from lm_jax.train.sft_data import BATCH_KEYS, make_batch
from lm_jax.train.state import TrainState
from lm_jax.train.step import accumulate_grads, apply_update, mask_frozen


def pair_logps(
    cfg: ModelConfig, params, batch: dict, *, chunk: int = 0, deterministic: bool = True,
    rngs: dict | None = None,
) -> PairLogps:  # fmt: skip
    """Completion log-probs of batch {"chosen": rows [B, T], "rejected": rows [B, T]} under
    `Transformer(cfg)` with `params`: one scorer pass over the [2B, T] rows (pure: grad it)."""
    B = batch["chosen"]["inputs"].shape[0]
    rows = {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]]) for k in BATCH_KEYS}
    s = score(cfg, params, rows, chunk=chunk, deterministic=deterministic, rngs=rngs)
    return PairLogps(s.sums[:B], s.sums[B:], s.counts[:B], s.counts[B:])


def batch_reference(batch: dict) -> PairLogps | None:
    """The batch's cached reference log-probs ("ref_chosen", "ref_rejected" [B]); None if
    absent (SimPO). Counts are the rows' completion tokens."""
    if "ref_chosen" not in batch:
        return None
    counts = [jnp.sum(batch[k]["loss_mask"], axis=1) for k in ("chosen", "rejected")]
    return PairLogps(batch["ref_chosen"], batch["ref_rejected"], *counts)


def loss_kwargs(pcfg: PreferenceConfig) -> dict:
    return dict(beta=pcfg.beta_, gamma=pcfg.gamma_ if pcfg.method == "simpo" else None,
                label_smoothing=pcfg.label_smoothing)  # fmt: skip


def batch_loss(
    params, batch: dict, rng, *, model_cfg: ModelConfig, pcfg: PreferenceConfig, chunk: int = 0,
    train: bool = True,
) -> tuple[jax.Array, dict]:  # fmt: skip
    """(mean loss over the batch's pairs, metrics) of `pcfg.method` for the policy `params`."""
    policy = pair_logps(model_cfg, params, batch, chunk=chunk, deterministic=not train,
                        rngs={"dropout": rng})  # fmt: skip
    return preference_loss(pcfg.method, policy, batch_reference(batch), **loss_kwargs(pcfg))


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    pcfg: PreferenceConfig,
    tx: optax.GradientTransformation,
    trainable=None,
) -> tuple[TrainState, dict]:
    """One optimizer step on the mean preference loss over `grad_accum` equal microbatches of
    pairs (the mean of their means); metrics are means over the pairs too."""
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.grad(batch_loss, has_aux=True)
    n = train_cfg.grad_accum

    def micro_grad(params, mb, r):
        return grad_fn(params, mb, r, model_cfg=model_cfg, pcfg=pcfg, chunk=train_cfg.loss_chunk)

    grads, m = accumulate_grads(micro_grad, state.params, batch, rng, n)
    grads = mask_frozen(grads, state.params, trainable)
    if n > 1:
        grads, m = jax.tree.map(lambda g: g / n, grads), jax.tree.map(lambda v: v / n, m)
    new, grad_norm, finite = apply_update(state, grads, m["loss"], tx=tx, train_cfg=train_cfg)
    tokens = sum(jnp.sum(batch[k]["segment_ids"] > 0) for k in ("chosen", "rejected"))
    return new, {**m, "grad_norm": grad_norm, "tokens": tokens, "finite": finite}


def batch_shardings(mesh, batch_size: int, reference: bool) -> dict:
    """Shardings of a pair batch: rows [B, T] and reference log-probs [B] split over the data
    axes."""
    rows = batch_sharding(mesh, 2, batch_size)
    out = {k: {name: rows for name in BATCH_KEYS} for k in ("chosen", "rejected")}
    if reference:
        out["ref_chosen"] = out["ref_rejected"] = batch_sharding(mesh, 1, batch_size)
    return out


def jit_train_step(model_cfg, train_cfg, pcfg, tx, state_sh, batch_sh, trainable=None):
    fn = functools.partial(train_step, model_cfg=model_cfg, train_cfg=train_cfg, pcfg=pcfg,
                           tx=tx, trainable=trainable)  # fmt: skip
    return jax.jit(
        fn,
        in_shardings=(state_sh, batch_sh, None),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


def score_pairs(
    scorer: Scorer, encoded: Sequence[EncodedPair], seq_len: int, batch_size: int = 32,
    length_multiple: int = 32,
) -> PairLogps:  # fmt: skip
    """Every pair's completion log-probs under `scorer`'s model: PairLogps of [N] float64
    numpy arrays. Rows of similar length are scored together, `batch_size` rows a pass (the
    last pass padded with empty rows, so few shapes compile)."""
    rows = [e.chosen for e in encoded] + [e.rejected for e in encoded]
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows))
    order = np.argsort([len(ids) for ids, _ in rows], kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        res = scorer.score(make_batch([rows[j] for j in idx], seq_len, length_multiple,
                                      rows=batch_size))  # fmt: skip
        sums[idx], counts[idx] = res.sums[: len(idx)], res.counts[: len(idx)]
    N = len(encoded)
    return PairLogps(sums[:N], sums[N:], counts[:N], counts[N:])


def pair_metrics(pcfg: PreferenceConfig, policy: PairLogps, reference: PairLogps | None) -> dict:
    """Host-side loss and metrics (floats) of scored pair sets."""
    as_jnp = lambda p: None if p is None else PairLogps(*(jnp.asarray(x) for x in p))  # noqa: E731
    _, m = preference_loss(pcfg.method, as_jnp(policy), as_jnp(reference), **loss_kwargs(pcfg))
    return {k: float(v) for k, v in jax.device_get(m).items()}
