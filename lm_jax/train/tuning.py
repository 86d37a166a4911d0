"""What every post-training task shares: a decoder trained from given params, full or LoRA.

Supervised fine-tuning (`lm_jax.train.finetune.SFTTask`) and preference optimisation
(`lm_jax.train.preference.PreferenceTask`) both start from a loaded model and train it on the one
loop (`lm_jax.train.engine`). This module is that common half:

  `check_model` / `prepare_model`  the config to train with (LoRA targets checked before anything
      compiles) and the params to train (fresh LoRA factors, optionally a bf16 base);
  `check_batching`                 batch sizes against the mesh and the model's max_len;
  `TunedModelTask`                 a `Task` with the sharded state, what checkpoints hold (LoRA:
      the adapters and their optimizer state only), `workdir/adapters` on every save, the peft
      export, the data iterator's host state and per-step records;
  `training_stats`                 parameter, trainable and optimizer-state counts for the log.

The options object (`FinetuneConfig`, `PreferenceConfig`) needs the fields `lora` (LoraConfig or
None: full training), `bf16_base`, `export_peft` and `save`.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax import adapters as lora_lib
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.lora import LoraConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.convert.peft import save_peft_adapters
from lm_jax.nn.transformer import Transformer
from lm_jax.optim import make_optimizer
from lm_jax.train import engine
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash
from lm_jax.train.state import init_train_state, state_shardings


class TuningOptions(Protocol):
    """The fields of a post-training config this module reads."""

    lora: LoraConfig | None
    bf16_base: bool
    export_peft: bool
    save: bool


# --------------------------------------------------------------------------- model set-up


def init_adapters(cfg: ModelConfig, seed: int = 0) -> dict:
    """Fresh LoRA factors (a: kaiming-uniform, b: zeros) for `cfg.lora`, without the base."""
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)

    @jax.jit
    def init(rng):  # the base's init is dead code here and compiled away
        return lora_lib.split_lora(nn.unbox(Transformer(cfg).init(rng, tokens)["params"]))[1]

    return init(jax.random.key(seed))


def check_model(base_cfg: ModelConfig, params, opts: TuningOptions) -> ModelConfig:
    """The config to train with. ConfigError if the base holds adapters or a LoRA target
    pattern matches no kernel (`params` may be abstract: nothing is computed or compiled)."""
    base, adapters = lora_lib.split_lora(nn.unbox(params))
    if adapters:
        raise ConfigError("the base model already holds LoRA leaves: merge them first.")
    if opts.lora is None:
        return base_cfg.replace(lora=None)
    cfg = base_cfg.replace(lora=opts.lora)
    matched = lora_lib.check_targets(cfg, jax.eval_shape(lambda: base))
    if opts.export_peft:
        odd = sorted(p for p in matched if not p.startswith("layers/") or "experts" in p)
        if odd:
            raise ConfigError(
                f"export_peft: LoRA targets {odd} have no peft counterpart (only attention and "
                "dense MLP projections export): narrow the targets or drop export_peft."
            )
    return cfg


def prepare_model(base_cfg: ModelConfig, params, opts: TuningOptions, seed: int = 0):
    """(model cfg, params to train, trainable mask fn or None); LoRA factors freshly made."""
    cfg = check_model(base_cfg, params, opts)
    params = nn.unbox(params)
    if opts.lora is None:
        return cfg, params, None
    params = lora_lib.combine(params, init_adapters(cfg, seed))
    if opts.bf16_base:
        params = lora_lib.cast_base(params, jnp.bfloat16)
    return cfg, params, lora_lib.trainable_mask


def check_batching(
    mesh, train_cfg: TrainConfig, batch_size: int, eval_batch_size: int, seq_len: int,
    max_len: int, rows: str = "batch_size",
) -> None:  # fmt: skip
    """ConfigError unless the batches split over the mesh's data-parallel devices (and into
    `grad_accum` microbatches) and `seq_len` fits the model; `rows` names the batch unit."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    for name, b in ((rows, batch_size), ("eval_batch_size", eval_batch_size)):
        if b % dp:
            raise ConfigError(
                f"{name} {b} is not divisible by the {dp} data-parallel devices of mesh "
                f"{dict(mesh.shape)}: change it or the mesh."
            )
    if train_cfg.grad_accum != 1 and batch_size % (train_cfg.grad_accum * dp):
        raise ConfigError(f"{rows} must divide into grad_accum microbatches over the mesh.")
    if seq_len > max_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_len {max_len}.")


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def training_stats(abstract, lora: LoraConfig | None, mesh, n_examples: int) -> dict:
    """Parameter / trainable / optimizer-state sizes of an abstract TrainState."""
    n_total = _count(abstract.params)
    n_train = _count(lora_lib.split_lora(abstract.params)[1]) if lora else n_total
    return {
        "mode": f"lora_r{lora.rank}" if lora else "full",
        "params": n_total,
        "trainable_params": n_train,
        "trainable_pct": 100.0 * n_train / n_total,
        "param_bytes": _nbytes(abstract.params),
        "optimizer_state_bytes": _nbytes(abstract.opt_state),
        "train_examples": n_examples,
        "mesh": dict(mesh.shape),
    }


def describe_stats(stats: dict) -> str:
    return (
        f"{stats['mode']}: {stats['trainable_params']:,} of {stats['params']:,} params trainable "
        f"({stats['trainable_pct']:.3f}%), optimizer state {stats['optimizer_state_bytes']:,} B"
    )


def median_step_time(times: list[float]) -> float:
    """Steady-state step time: the first steps compile (one compile per padded length)."""
    warm = sorted(times[min(5, len(times) - 1) :]) if times else []
    return float(warm[len(warm) // 2]) if warm else float("nan")


# --------------------------------------------------------------------------- the task


class TunedModelTask(Task):
    """Full or LoRA training of `cfg` from `params` on the one loop; subclasses add the data
    (`self.data`: a resumable iterator with get_state / set_state / last_indices), the step
    (`self.step_fn(state, batch, rng)`, `self.put(batch)`), evaluation and `meta`.

    LoRA checkpoints hold the adapters and their optimizer state only (the frozen base comes
    back from `init_state`); every save also writes `workdir/adapters` (`save_adapters`) and,
    with `export_peft`, the final state a peft folder `workdir/peft`.
    """

    data = None

    def __init__(self, cfg, params, trainable, train_cfg: TrainConfig, opts: TuningOptions,
                 *, mesh, base_name=None, log=print):  # fmt: skip
        self.cfg, self.params, self.trainable = cfg, params, trainable
        self.train_cfg, self.opts, self.mesh, self.log = train_cfg, opts, mesh, log
        self.base_name = base_name
        self.tx = make_optimizer(train_cfg, trainable=trainable)
        self.abstract, self.shardings = state_shardings(cfg, self.tx, mesh)
        self.rng = jax.random.key(train_cfg.seed + 1)
        self.step_times: list[float] = []

    def init_state(self):
        state, _ = init_train_state(self.cfg, self.tx, self.mesh, self.train_cfg.seed,
                                    params=self.params)  # fmt: skip
        return state

    def abstract_state(self):
        # LoRA: the frozen base is grafted from a fresh state, so the loop makes one anyway
        return None if self.opts.lora is not None else (self.abstract, self.shardings)

    def params_mask(self, state):
        return None if self.opts.lora is None else lora_lib.trainable_mask(self.abstract.params)

    def host_state(self) -> dict:
        return self.data.get_state()

    def set_host_state(self, state: dict) -> None:
        self.data.set_state(state)

    def put(self, batch: dict):
        """The host batch placed on the mesh (override for other layouts)."""
        raise NotImplementedError

    def train_step(self, state, step: int):
        batch = self.put(next(self.data))
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            state, m = self.step_fn(state, batch, self.rng)
        m = jax.device_get(m)
        self.step_times.append(time.perf_counter() - t0)
        return state, m

    def step_record(self, step: int, metrics: dict, state) -> dict:
        return {
            "step": step,
            "loss_hex": float(metrics["loss"]).hex(),
            "example_ids": self.data.last_indices,
            "params_hash": params_hash(state.params),
        }

    def adapters(self, state) -> dict:
        return jax.device_get(lora_lib.split_lora(state.params)[1])

    def export_peft(self, state) -> None:
        """With `save`, LoRA and `export_peft`: the adapters as a peft folder `workdir/peft`."""
        opts, workdir = self.opts, self.train_cfg.workdir
        if opts.save and opts.lora is not None and opts.export_peft:
            save_peft_adapters(os.path.join(workdir, "peft"), self.adapters(state), self.cfg,
                               None, self.base_name)  # fmt: skip
            self.log(f"peft adapters written to {os.path.join(workdir, 'peft')}")

    def on_save(self, state, step: int) -> None:
        if self.opts.lora is None:
            return
        nbytes = lora_lib.save_adapters(
            os.path.join(self.train_cfg.workdir, "adapters"),
            self.adapters(state),
            self.opts.lora,
            extra={"step": step, "base": self.base_name,
                   "model": self.cfg.replace(lora=None).to_dict()},
        )  # fmt: skip
        self.log(f"saved adapters ({nbytes:,} bytes) at step {step}")


def run_tuning(task, cfg: ModelConfig, tokenizer, train_cfg: TrainConfig, opts, n_examples: int,
               log=print):  # fmt: skip
    """Run a post-training `task` on the one loop (`opts`: its `lora` and `save`): log the
    parameter statistics, save the tokenizer beside a full-model run. Returns (the loop's
    `LoopResult`, `run_summary`)."""
    stats = training_stats(task.abstract, opts.lora, task.mesh, n_examples)
    log(describe_stats(stats))
    if opts.save and opts.lora is None and jax.process_index() == 0:
        tokenizer.save(os.path.join(train_cfg.workdir, "tokenizer"))
    run_cfg = train_cfg if opts.save else train_cfg.replace(save_every=0)
    res = engine.run(task, run_cfg, log, save=opts.save)
    final = {k.split("/", 1)[1]: v for k, v in res.eval.items() if k.startswith("eval/")}
    return res, run_summary(cfg, res, task, stats, final)


def run_summary(cfg: ModelConfig, res, task, stats: dict, final: dict) -> dict:
    """What a post-training run returns: the model, its final state, step-time statistics, the
    train-loss history, the final evaluation and the step it resumed from."""
    stats["step_time_s_median"] = median_step_time(task.step_times)
    history = [float(r["train/loss"]) for r in res.history if "train/loss" in r]
    return {
        "model_config": cfg,
        "params": res.state.params,
        "state": res.state,
        "stats": stats,
        "history": history,
        "final": final,
        "resumed_from": res.resumed_from,
    }
