"""The pretraining loop: mesh, data, sharded state, steps, eval, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from lm_jax.checkpoint import Checkpointer, check_resume_config, meta_dict
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.data.tokenizer import Tokenizer, load_tokenizer
from lm_jax.flops import device_peak_flops, flops_per_token
from lm_jax.optim import make_optimizer
from lm_jax.scoring import token_byte_lengths
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.metrics import MetricWriter, format_metrics
from lm_jax.train.state import init_train_state, state_shardings
from lm_jax.train.step import jit_eval_step, jit_train_step


class TrainingHalted(RuntimeError):
    """Training stopped on a non-finite loss (the message says at which step and why)."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a pretraining run needs."""

    model: ModelConfig
    data: Any  # lm_jax.data.DataConfig
    train: TrainConfig
    vocab_from_tokenizer: bool = True  # set model.vocab_size to the tokenizer's
    debug_nonfinite_step: int = -1  # inject a NaN loss/gradient at this step (fault tests)
    debug_nonfinite_count: int = 1  # ... and at the steps after it: this many bad steps in all


def data_axes_size(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]


def check_batch(exp: Experiment, mesh) -> None:
    """Batch/mesh/accumulation compatibility, checked before anything compiles."""
    B, n = exp.data.batch_size, exp.train.grad_accum
    dp = data_axes_size(mesh)
    if B % n:
        raise ConfigError(f"batch_size {B} is not divisible by grad_accum {n}")
    if (B // n) % dp:
        raise ConfigError(
            f"microbatch size {B // n} (batch_size {B} / grad_accum {n}) is not divisible by the "
            f"{dp} data-parallel devices of mesh {dict(mesh.shape)}; change --batch_size or --mesh"
        )
    if B % jax.process_count():
        raise ConfigError(f"batch_size {B} must divide over {jax.process_count()} processes")


def prepare_tokenizer(exp: Experiment, workdir: str) -> Tokenizer:
    """Load the run's saved tokenizer, or build it from the training texts and save it."""
    from lm_jax.data import build_tokenizer_for

    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.isdir(tok_dir):
        return load_tokenizer(tok_dir)
    tok = build_tokenizer_for(exp.data)
    if jax.process_index() == 0:
        tok.save(tok_dir)
    return tok


def params_hash(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:16]


class _Preemption:
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


def evaluate(params, exp: Experiment, tok, eval_fn, to_global, byte_lens) -> dict:
    """Validation loss, perplexity and bits per byte over `eval_batches` (0 = whole split)."""
    from lm_jax.data import make_text_dataset

    it = make_text_dataset(
        exp.data,
        tok,
        "validation",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        repeat=False,
    )
    nll = tokens = nbytes = 0.0
    for i, batch in enumerate(it):
        if exp.train.eval_batches and i >= exp.train.eval_batches:
            break
        m = eval_fn(params, to_global(batch))
        nll += float(m["nll_sum"])
        tokens += float(m["tokens"])
        nbytes += float(np.sum(byte_lens[batch["targets"]] * batch["loss_mask"]))
    if tokens == 0:
        raise ValueError("the validation split yielded no tokens; check --data.source")
    if not exp.train.eval_batches and getattr(it, "total_bytes", 0):
        nbytes = float(it.total_bytes)  # the whole split was scored: its exact UTF-8 size
    loss = nll / tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": tokens}
    if nbytes > 0 and jax.process_count() == 1:
        out["bits_per_byte"] = nll / math.log(2) / nbytes
    return out


def train(exp: Experiment, log=print) -> dict:
    """Run (or resume) training; returns the final metrics."""
    tcfg = exp.train
    workdir = tcfg.workdir
    mesh = make_mesh(tcfg.mesh)
    check_batch(exp, mesh)
    tok = prepare_tokenizer(exp, workdir)
    model_cfg = exp.model
    if exp.vocab_from_tokenizer and model_cfg.vocab_size != tok.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
    tok.check_fits(model_cfg.vocab_size)
    if exp.data.seq_len > model_cfg.max_len:
        raise ConfigError(
            f"data seq_len {exp.data.seq_len} exceeds the model's max_len {model_cfg.max_len}"
        )
    if model_cfg.moe is not None:
        from lm_jax.nn.moe import check_moe_mesh

        check_moe_mesh(model_cfg, mesh)

    from lm_jax.data import make_text_dataset

    tx = make_optimizer(tcfg)
    abstract, shardings = state_shardings(model_cfg, tx, mesh)
    ckpt = Checkpointer(workdir, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing)
    train_it = make_text_dataset(
        exp.data,
        tok,
        "train",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    meta = meta_dict(model_cfg, tcfg, exp.data)
    restored = ckpt.restore_latest(abstract, shardings) if ckpt.all_steps() else None
    if restored is not None:
        step0, state, data_state, saved_meta = restored
        changes = check_resume_config(step0, ckpt.directory, saved_meta, meta)
        train_it.set_state(data_state)
        log(f"resumed from step {step0} in {ckpt.directory}")
        if changes:
            log("config changed since that checkpoint: " + ", ".join(changes))
    else:
        state, _ = init_train_state(model_cfg, tx, mesh, tcfg.seed)
    st = train_it.stats
    log(
        f"data: {st['documents']} documents, {st['tokens']} tokens, {st['rows']} rows of "
        f"{exp.data.seq_len} per epoch; {st['split_documents']} documents longer than the rest "
        "of their row continue in the next row (packing: nothing truncated or dropped)"
    )

    bsh = batch_sharding(mesh, 2, exp.data.batch_size)

    def to_global(batch):
        return {
            k: jax.make_array_from_process_local_data(bsh, np.asarray(v))
            for k, v in batch.items()
            if k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
        }

    step_fn = jit_train_step(model_cfg, tcfg, tx, shardings, bsh)
    if tcfg.print_memory:
        log(memory_report(step_fn, state, exp.data.batch_size, exp.data.seq_len, bsh))
    flops_tok = flops_per_token(model_cfg, exp.data.seq_len)
    peak = tcfg.peak_flops or device_peak_flops() or 0.0
    bad_fn = (
        jit_train_step(model_cfg, tcfg, tx, shardings, bsh, inject_nonfinite=True)
        if exp.debug_nonfinite_step >= 0
        else None
    )
    eval_fn = jit_eval_step(model_cfg, tcfg, shardings.params, bsh)
    byte_lens = token_byte_lengths(tok, model_cfg.vocab_size)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    rng = jax.random.key(tcfg.seed + 1)
    step = int(jax.device_get(state.step))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log(
        f"model: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
        f"tokenizer {tok.kind} (vocab {tok.vocab_size}), start step {step}/{tcfg.steps}"
    )

    bar = None
    if tcfg.progress_bar and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, initial=step, desc="train", dynamic_ncols=True)
    consecutive_bad, last_eval, t0, tokens_seen = 0, {}, time.perf_counter(), 0.0
    details = open(os.path.join(workdir, "steps.jsonl"), "a") if tcfg.log_step_details else None  # noqa: SIM115
    row: dict = {}

    def save(s, force=False):
        if not ckpt.save(s, state, train_it.get_state(), meta, force=force):
            return
        log(f"saved checkpoint step {s}")

    with _Preemption() as preempt:
        while step < tcfg.steps:
            if tcfg.profile_steps and step == tcfg.profile_start:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            if tcfg.profile_steps and step == tcfg.profile_start + tcfg.profile_steps:
                jax.profiler.stop_trace()
            batch = next(train_it)
            bad = 0 <= step - exp.debug_nonfinite_step < exp.debug_nonfinite_count
            fn = bad_fn if bad else step_fn
            state, m = fn(state, to_global(batch), rng)
            step += 1
            finite = bool(m["finite"])
            if details is not None:
                details.write(_step_record(step, m, batch, state) + "\n")
                details.flush()
            if not finite:
                consecutive_bad += 1
                if tcfg.nonfinite == "halt" or consecutive_bad >= tcfg.max_consecutive_skips:
                    ckpt.wait()
                    raise TrainingHalted(
                        f"non-finite loss/gradient at step {step} ({consecutive_bad} in a row; "
                        f"policy {tcfg.nonfinite!r}). The last good checkpoint is kept in "
                        f"{ckpt.directory}. Lower the learning rate, check the data, or use "
                        "--nonfinite=skip."
                    )
                log(f"step {step}: non-finite loss, update skipped ({consecutive_bad} in a row)")
                continue
            consecutive_bad = 0
            tokens_seen += float(m["tokens"])
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                dt = time.perf_counter() - t0
                row = writer.write(step, {k: v for k, v in m.items() if k != "finite"}, "train/")
                row["train/tokens_per_s"] = tokens_seen / max(dt, 1e-9)
                if peak:
                    row["train/mfu"] = (
                        row["train/tokens_per_s"] * flops_tok / (peak * jax.device_count())
                    )
                writer.write(step, {k: row[k] for k in row if k in _RATE_KEYS})
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_s']:.0f}"
                    )
                else:
                    log(format_metrics(step, row))
                t0, tokens_seen = time.perf_counter(), 0.0
            if bar is not None:
                bar.update(1)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                last_eval = evaluate(state.params, exp, tok, eval_fn, to_global, byte_lens)
                writer.write(step, last_eval, "eval/")
                log(format_metrics(step, {f"eval/{k}": v for k, v in last_eval.items()}))
            if tcfg.save_every and step % tcfg.save_every == 0:
                save(step)
            if preempt.requested:
                if ckpt.latest_step() != step:
                    save(step, force=True)
                ckpt.wait()
                log(f"SIGTERM: saved step {step} and stopped; rerun the same command to resume")
                break
    if bar is not None:
        bar.close()
    finished = step >= tcfg.steps
    if finished and ckpt.latest_step() != step:
        save(step, force=True)
    ckpt.wait()
    ckpt.close()
    if details is not None:
        details.close()
    if finished:
        last_eval = evaluate(state.params, exp, tok, eval_fn, to_global, byte_lens)
        writer.write(step, last_eval, "eval/")
        log(format_metrics(step, {f"eval/{k}": v for k, v in last_eval.items()}))
    writer.close()
    return {
        "step": step,
        "finished": finished,
        "eval": last_eval,
        "train": row,
        "state": state,
        "model_config": model_cfg,
        "tokenizer": tok,
    }


_RATE_KEYS = ("train/tokens_per_s", "train/mfu")


def memory_report(step_fn, state, batch_size: int, seq_len: int, bsh) -> str:
    """The compiled train step's memory analysis (arguments, outputs, temporaries)."""
    import jax.numpy as jnp

    spec = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=bsh)
    fspec = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=bsh)
    batch = {
        "inputs": spec,
        "targets": spec,
        "positions": spec,
        "segment_ids": spec,
        "loss_mask": fspec,
    }
    m = step_fn.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    if m is None:
        return "memory analysis: not available on this backend"
    gib = 1 / 2**30
    return (
        f"memory per device: arguments {m.argument_size_in_bytes * gib:.3f} GiB, outputs "
        f"{m.output_size_in_bytes * gib:.3f} GiB, temporaries "
        f"{m.temp_size_in_bytes * gib:.3f} GiB, generated code "
        f"{m.generated_code_size_in_bytes * gib:.4f} GiB"
    )


def _step_record(step: int, m: dict, batch: dict, state) -> str:
    import json

    loss = float(m["loss"])
    ids, counts = np.unique(batch.get("example_ids", np.zeros((0,), np.int32)), return_counts=True)
    keep = ids >= 0
    return json.dumps(
        {
            "step": step,
            "loss_hex": loss.hex(),
            "finite": bool(m["finite"]),
            "example_ids": [int(i) for i in ids[keep]],
            "example_tokens": [int(c) for c in counts[keep]],  # input tokens of each id
            "params_hash": params_hash(state.params),
        }
    )


def sample_text(
    model_cfg,
    params,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    seed=0,
    temperature=0.8,
    top_k=0,
) -> list[str]:
    """Decode samples from the trained model (KV-cache generator)."""
    from lm_jax.generate import generate

    ids = [tok.encode(p) or [tok.eos_id if tok.eos_id is not None else 0] for p in prompts]
    room = model_cfg.max_len - max(len(i) for i in ids)
    out = generate(
        model_cfg,
        params,
        ids,
        jax.random.key(seed),
        min(max_new_tokens, room),
        temperature=temperature,
        top_k=top_k,
        stop_tokens=() if tok.eos_id is None else (tok.eos_id,),
    )
    toks = np.asarray(out.tokens)
    lens = np.asarray(out.lengths)
    return [
        p + tok.decode([int(t) for t in toks[i, : lens[i]] if t != tok.eos_id])
        for i, p in enumerate(prompts)
    ]


__all__ = ["Experiment", "TrainingHalted", "evaluate", "sample_text", "train"]


def print_samples(result: dict, exp: Experiment, prompts=("\n", "ROMEO:")) -> list[str]:
    """Print samples from a finished run's state."""
    tok = result["tokenizer"]
    if exp.train.num_samples <= 0 or exp.train.sample_tokens <= 0:
        return []
    prompts = [p for p in prompts if _encodable(tok, p)] or ["\n"]
    texts = sample_text(
        result["model_config"],
        result["state"].params,
        tok,
        list(prompts)[: exp.train.num_samples],
        exp.train.sample_tokens,
        seed=exp.train.seed,
    )
    for t in texts:
        print("-" * 40 + "\n" + t)
    return texts


def _encodable(tok, text: str) -> bool:
    try:
        return bool(tok.encode(text))
    except Exception:  # noqa: BLE001 - e.g. a char tokenizer without ':'
        return False


def evaluate_checkpoint(exp: Experiment) -> dict:
    """Validation metrics of the newest checkpoint in `exp.train.workdir`."""
    from lm_jax.checkpoint import load_model

    model_cfg, params, tok = load_model(exp.train.workdir)
    mesh = make_mesh(exp.train.mesh)
    bsh = batch_sharding(mesh, 2, exp.data.batch_size)
    from lm_jax.sharding import params_shardings
    from lm_jax.train.state import abstract_params

    p_sh = params_shardings(abstract_params(model_cfg), mesh)
    eval_fn = jit_eval_step(model_cfg, exp.train, p_sh, bsh)

    def to_global(batch):
        return {
            k: jax.make_array_from_process_local_data(bsh, np.asarray(v))
            for k, v in batch.items()
            if k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
        }

    return evaluate(
        params, exp, tok, eval_fn, to_global, token_byte_lengths(tok, model_cfg.vocab_size)
    )
