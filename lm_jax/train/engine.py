"""The one training loop under every pillar: pretraining, fine-tuning, alignment, image-text.

A pillar supplies a `Task` (how to make the state, one step, evaluation, what to save); the
loop owns everything else: restore from the newest intact checkpoint (state, the task's
host state such as the data iterator position, and the config check), the step loop, the
non-finite policy (`halt`, or `skip` up to `max_consecutive_skips` in a row), metrics to
stdout / `metrics.jsonl` / TensorBoard, the progress bar, periodic evaluation, Orbax saves,
SIGTERM (save and stop; exit 0), and the final save and evaluation.

Resume is exact: steps are pure functions of (state, step index) and the task's host state, so
a run killed at any point and started again with the same command reproduces the
uninterrupted run's losses and parameters to the bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lm_jax.checkpoint import Checkpointer, check_resume_config
from lm_jax.configs.train import TrainConfig
from lm_jax.train.metrics import MetricWriter, _scalar, format_metrics


class TrainingHalted(RuntimeError):
    """Training stopped on a non-finite loss (the message says at which step and why)."""


class Task:
    """What a pillar gives the loop. Override what applies; defaults do nothing.

    `train_step(state, step)` runs update number `step + 1` (it reads its own batch, e.g. from
    a resumable iterator or by sampling with `jax.random.fold_in(key, step)`) and returns
    (new state, metrics). Metrics may be device arrays; a boolean `finite` entry feeds the
    non-finite policy; anything else is logged with `metric_prefix`.
    """

    metric_prefix = "train/"
    eval_at_start = False  # also evaluate the initial state (step 0)
    metrics_every_step = False  # write every step's metrics (stdout still every log_every)
    tensorboard = True

    def init_state(self):
        """A fresh state (a dataclass with `step` and `params`), already placed on the mesh."""
        raise NotImplementedError

    def abstract_state(self):
        """(abstract state, shardings) to restore into; None: derived from `init_state()`."""
        return None

    def params_mask(self, state):
        """Tree of bools over `state.params`: the leaves checkpoints hold (the others come
        back from `init_state`, e.g. a frozen LoRA base). None = all."""
        return None

    def train_step(self, state, step: int):
        raise NotImplementedError

    def host_state(self) -> dict:
        """JSON-able host state at the current step (data iterator position, ...)."""
        return {}

    def set_host_state(self, state: dict) -> None:
        pass

    def evaluate(self, state, step: int) -> dict:
        return {}

    def final_evaluate(self, state, step: int) -> dict:
        return self.evaluate(state, step)

    def on_save(self, state, step: int) -> None:
        """Extra artifacts written with every checkpoint (adapters, exports)."""

    def meta(self) -> dict:
        """Configs saved with checkpoints and compared on resume (`check_resume_config`)."""
        return {}

    def close(self) -> None:
        """Release what the task holds (e.g. a prefetch thread) when the loop ends."""

    def describe(self, state) -> str:
        """A one-line summary printed once the state exists."""
        return ""

    def step_record(self, step: int, metrics: dict, state) -> dict | None:
        """With `log_step_details`: one JSON row per step to `steps.jsonl`."""
        return None

    def rates(self, window: dict) -> dict:
        """Extra rate metrics of a logging window ({'seconds', 'tokens', 'steps'})."""
        return {}


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    finished: bool
    history: list[dict]  # rows of this process: {step, **train metrics, **eval metrics}
    eval: dict  # the last evaluation
    train: dict  # the last logged train row
    resumed_from: int | None


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class _NoCheckpoints:
    """Stands in for the Checkpointer when a run saves nothing."""

    directory = "(no checkpoints: saving is off)"

    def all_steps(self):
        return []

    def latest_step(self):
        return None

    def save(self, *a, **k):
        return False

    def wait(self):
        pass

    def close(self):
        pass


def abstract_of(state):
    """(ShapeDtypeStruct tree, sharding tree) of a concrete state."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return abstract, jax.tree.map(lambda x: x.sharding, state)


def _host(metrics: dict) -> dict:
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def run(
    task: Task, tcfg: TrainConfig, log: Callable[[str], None] = print, save: bool = True
) -> LoopResult:
    """Run (or resume) `task` for `tcfg.steps` steps in `tcfg.workdir`. `save=False`: no
    checkpoints at all (metrics only; nothing to resume from)."""
    workdir = tcfg.workdir
    os.makedirs(workdir, exist_ok=True)
    ckpt = (
        Checkpointer(workdir, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing)
        if save
        else _NoCheckpoints()
    )
    meta = task.meta()
    spec = task.abstract_state()
    fresh = None
    if spec is None or not ckpt.all_steps():
        fresh = task.init_state()
    mask = task.params_mask(fresh)
    restored = None
    if ckpt.all_steps():
        if spec is None:
            spec = abstract_of(fresh)
        base = fresh.params if (mask is not None and fresh is not None) else None
        if mask is not None and base is None:
            fresh = task.init_state()
            base = fresh.params
        restored = ckpt.restore_latest(*spec, params_mask=mask, base_params=base)
    resumed_from = None
    if restored is not None:
        resumed_from, state, host_state, saved_meta = restored
        changes = check_resume_config(resumed_from, ckpt.directory, saved_meta, meta)
        task.set_host_state(host_state)
        log(f"resumed from step {resumed_from} in {ckpt.directory}")
        if changes:
            log("config changed since that checkpoint: " + ", ".join(changes))
    else:
        state = fresh if fresh is not None else task.init_state()
    del fresh
    step = int(jax.device_get(state.step))
    desc = task.describe(state)
    log((desc + ", " if desc else "") + f"start step {step}/{tcfg.steps}")

    writer = MetricWriter(
        workdir, tensorboard=task.tensorboard, enabled=jax.process_index() == 0
    )
    details = None
    if tcfg.log_step_details and jax.process_index() == 0:
        details = open(os.path.join(workdir, "steps.jsonl"), "a")  # noqa: SIM115
    bar = None
    if tcfg.progress_bar and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, initial=step, desc="train", dynamic_ncols=True)

    history: list[dict] = []
    last_eval: dict = {}
    last_row: dict = {}
    consecutive_bad = 0
    window = {"seconds": 0.0, "tokens": 0.0, "steps": 0, "t0": time.perf_counter()}

    def save_step(s: int, force: bool = False) -> None:
        if ckpt.save(s, state, task.host_state(), meta, force=force, params_mask=mask):
            task.on_save(state, s)
            log(f"saved checkpoint step {s}")

    def evaluate(s: int, final: bool = False) -> dict:
        out = task.final_evaluate(state, s) if final else task.evaluate(state, s)
        if out:
            writer.write(s, out)
            log(format_metrics(s, out))
        return out

    if task.eval_at_start and step == 0:
        last_eval = evaluate(0)
        history.append({"step": 0, **last_eval})

    def account(s: int, m: dict, state_now) -> dict | None:
        """Book step `s`'s metrics: the non-finite policy, per-step records, counters. None if
        the step was skipped (non-finite). `state_now` is the state after step s, or None when
        the metrics are read one step late (no per-step records then)."""
        nonlocal consecutive_bad
        m = _host(m)
        finite = bool(m.pop("finite", True))
        if details is not None and state_now is not None:
            rec = task.step_record(s, {**m, "finite": finite}, state_now)
            if rec is not None:
                details.write(json.dumps(rec) + "\n")
                details.flush()
        if bar is not None:
            bar.update(1)
        if not finite:
            consecutive_bad += 1
            if tcfg.nonfinite == "halt" or consecutive_bad >= tcfg.max_consecutive_skips:
                ckpt.wait()
                raise TrainingHalted(
                    f"non-finite loss/gradient at step {s} ({consecutive_bad} in a row; "
                    f"policy {tcfg.nonfinite!r}). The last good checkpoint is kept in "
                    f"{ckpt.directory}. Lower the learning rate, check the data, or use "
                    "--train.nonfinite=skip."
                )
            log(f"step {s}: non-finite loss, update skipped ({consecutive_bad} in a row)")
            return None
        consecutive_bad = 0
        window["steps"] += 1
        window["tokens"] += float(m.get("tokens", 0.0))
        row = {"step": s, **{task.metric_prefix + k: _scalar(v) for k, v in m.items()}}
        history.append(row)
        if task.metrics_every_step and s % tcfg.log_every and s != tcfg.steps:
            writer.write(s, m, task.metric_prefix)
        return m

    def must_sync(s: int) -> bool:
        """Steps whose metrics are read at once: anything that logs, evaluates or saves."""
        return (
            details is not None
            or s % tcfg.log_every == 0
            or s == tcfg.steps
            or bool(tcfg.eval_every and s % tcfg.eval_every == 0)
            or bool(tcfg.save_every and s % tcfg.save_every == 0)
        )

    pending = None  # (step, device metrics): read after the next step is dispatched
    try:
        with Preemption() as preempt:
            while step < tcfg.steps:
                if tcfg.profile_steps and step == tcfg.profile_start:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                if tcfg.profile_steps and step == tcfg.profile_start + tcfg.profile_steps:
                    jax.profiler.stop_trace()
                state, m = task.train_step(state, step)
                step += 1
                if pending is not None:  # the step before ran while this one was dispatched
                    account(*pending, None)
                    pending = None
                if not (must_sync(step) or preempt.requested):
                    pending = (step, m)
                    continue
                m = account(step, m, state)
                if m is None:  # a skipped (non-finite) step: nothing is logged, evaluated or saved
                    continue
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    dt = time.perf_counter() - window["t0"]
                    window["seconds"] = dt
                    rates = {"steps_per_s": window["steps"] / max(dt, 1e-9)}
                    if window["tokens"]:
                        rates["tokens_per_s"] = window["tokens"] / max(dt, 1e-9)
                    rates.update(task.rates(window))
                    last_row = writer.write(step, m, task.metric_prefix)
                    last_row.update(writer.write(step, rates, task.metric_prefix))
                    if bar is not None:
                        post = {}
                        if "loss" in m:
                            post["loss"] = f"{float(m['loss']):.4f}"
                        if "tokens_per_s" in rates:
                            post["tok_s"] = f"{rates['tokens_per_s']:.0f}"
                        bar.set_postfix(**post)
                    else:
                        log(format_metrics(step, last_row))
                    window = {"seconds": 0.0, "tokens": 0.0, "steps": 0, "t0": time.perf_counter()}
                if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                    last_eval = evaluate(step)
                    if history and history[-1]["step"] == step:
                        history[-1].update(last_eval)
                if tcfg.save_every and step % tcfg.save_every == 0:
                    save_step(step)
                if preempt.requested:
                    if ckpt.latest_step() != step:
                        save_step(step, force=True)
                    ckpt.wait()
                    log(f"SIGTERM: saved step {step} and stopped; rerun the same command to resume")
                    break
    finally:
        task.close()
    if bar is not None:
        bar.close()
    finished = step >= tcfg.steps
    if finished and ckpt.latest_step() != step:
        save_step(step, force=True)
    ckpt.wait()
    ckpt.close()
    if details is not None:
        details.close()
    if finished:
        last_eval = evaluate(step, final=True)
        if history and history[-1].get("step") == step:
            history[-1].update(last_eval)
        else:
            history.append({"step": step, **last_eval})
    writer.close()
    return LoopResult(state, step, finished, history, last_eval, last_row, resumed_from)


def read_history(workdir: str) -> list[dict]:
    """`metrics.jsonl` merged by step (a resumed run rewrites the steps after its checkpoint:
    the later row wins, and the values are the same to the bit)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows: dict[int, dict] = {}
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.setdefault(r["step"], {}).update(r)
    return [rows[s] for s in sorted(rows)]
