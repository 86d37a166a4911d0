"""Training configuration. Never reaches modules."""

from __future__ import annotations

import dataclasses
from typing import Literal

from lm_jax.configs.base import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, checkpointing and logging of one training run."""

    steps: int = 100  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    # cosine | constant | wsd: warmup-stable-decay, the peak until the cooldown, which takes the
    # last `cooldown_fraction` of lr_decay_steps down to min_lr (a stable run can be extended)
    lr_schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 10  # linear warmup steps
    lr_decay_steps: int | None = None  # the schedule reaches min_lr here; None = `steps`
    cooldown_fraction: float = 0.2  # wsd: share of lr_decay_steps spent in the cooldown
    cooldown_shape: Literal["linear", "1-sqrt"] = "1-sqrt"  # wsd: (Hägele et al. 2024)
    min_lr_ratio: float = 0.1  # final lr = ratio * learning_rate
    # adamw | adafactor: factored second moments with updates scaled by each matrix's RMS
    # (Shazeer & Stern 2018; T5's optimizer: its std-1 embeddings learn at Adam's fixed step
    # size only slowly); adafactor ignores beta1/beta2/adam_eps
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = 0.1  # decay on matrices only (adafactor: scaled by the lr, as optax)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    grad_accum: int = 1  # microbatches per step (the batch is split, the step is exact)
    z_loss: float = 0.0  # coefficient of log(Z)^2 (PaLM z-loss)
    # positions per LM-head chunk in the loss: the [B, T, V] logits are never materialised, only
    # [B, loss_chunk, V] at a time (recomputed in the backward pass); 0 = all T positions at once
    loss_chunk: int = 0
    seed: int = 0  # parameter init and dropout
    mesh: str = ""  # e.g. "data:2,fsdp:2,tensor:2"; "" = all devices on data
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 20  # validation batches per pass; 0 = whole split
    log_every: int = 10  # steps between metric lines
    save_every: int = 100  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # max_to_keep
    async_checkpointing: bool = True
    workdir: str = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events
    nonfinite: Literal["halt", "skip"] = "halt"  # on a non-finite loss/gradient
    max_consecutive_skips: int = 3  # with nonfinite="skip": halt after this many in a row
    sample_every: int = 0  # print samples every N steps; 0 = only at the end
    num_samples: int = 2  # samples printed
    sample_tokens: int = 200  # tokens per sample
    log_step_details: bool = False  # per-step JSONL: loss hex, example ids, param hash
    progress_bar: bool = True
    prefetch_batches: int = 2  # batches read and sent to the devices ahead on a thread; 0 = off
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = the detected accelerator's
    print_memory: bool = False  # print the compiled train step's memory analysis
    profile_steps: int = 0  # jax.profiler trace of this many steps (TensorBoard), 0 = off
    profile_start: int = 5  # first profiled step

    def __post_init__(self):
        checks = [
            (self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (
                0 <= self.min_lr_ratio <= 1,
                f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
            ),
            (
                0.0 < self.cooldown_fraction <= 1.0,
                f"cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}",
            ),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (
                self.loss_chunk >= 0,
                f"loss_chunk must be >= 0 (0 = no chunking), got {self.loss_chunk}",
            ),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.max_consecutive_skips >= 1, "max_consecutive_skips must be >= 1"),
            (self.prefetch_batches >= 0, "prefetch_batches must be >= 0 (0 = no prefetch)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)


# The TrainConfig fields a task over a fixed list of examples reads (the tagger and seq2seq
# binaries: `lm_jax.train.example_task`); the others would do nothing there.
EXAMPLE_TASK_FIELDS = (
    "steps learning_rate lr_schedule warmup_steps min_lr_ratio optimizer weight_decay beta1 beta2 "
    "adam_eps grad_clip seed mesh eval_every log_every save_every keep_checkpoints workdir "
    "nonfinite max_consecutive_skips log_step_details progress_bar"
).split()
