"""The pretraining loop: mesh, data, sharded state, steps, eval, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any

import jax
import numpy as np

from lm_jax.checkpoint import load_model, meta_dict
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.data import build_tokenizer_for, make_text_dataset
from lm_jax.data.prefetch import Prefetcher
from lm_jax.data.tokenizer import Tokenizer, load_tokenizer
from lm_jax.flops import device_peak_flops, flops_per_token
from lm_jax.generate import generate
from lm_jax.nn.moe import check_moe_mesh
from lm_jax.optim import make_optimizer
from lm_jax.scoring import token_byte_lengths
from lm_jax.sharding import batch_sharding, make_mesh, params_shardings
from lm_jax.train import engine
from lm_jax.train.engine import Task, TrainingHalted
from lm_jax.train.state import abstract_params, init_train_state, state_shardings
from lm_jax.train.step import jit_eval_step, jit_train_step


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
            f"{dp} data-parallel devices of mesh {dict(mesh.shape)}; "
            "change --data.batch_size or --train.mesh"
        )
    if B % jax.process_count():
        raise ConfigError(f"batch_size {B} must divide over {jax.process_count()} processes")


def prepare_tokenizer(exp: Experiment, workdir: str) -> Tokenizer:
    """Load the run's saved tokenizer, or build it from the training texts and save it."""
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


def evaluate(params, exp: Experiment, tok, eval_fn, to_global, byte_lens) -> dict:
    """Validation loss, perplexity and bits per byte over `eval_batches` (0 = whole split)."""
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


def _to_global_fn(bsh):
    def to_global(batch):
        return {
            k: jax.make_array_from_process_local_data(bsh, np.asarray(v))
            for k, v in batch.items()
            if k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
        }

    return to_global


class PretrainTask(Task):
    """Next-token prediction on the packed text stream of `exp.data`."""

    def __init__(self, exp: Experiment, log=print):
        tcfg = exp.train
        self.exp, self.log = exp, log
        self.mesh = mesh = make_mesh(tcfg.mesh)
        check_batch(exp, mesh)
        self.tok = tok = prepare_tokenizer(exp, tcfg.workdir)
        model_cfg = exp.model
        if exp.vocab_from_tokenizer and model_cfg.vocab_size != tok.vocab_size:
            model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
        tok.check_fits(model_cfg.vocab_size)
        if exp.data.seq_len > model_cfg.max_len:
            raise ConfigError(
                f"data seq_len {exp.data.seq_len} exceeds the model's max_len {model_cfg.max_len}"
            )
        if model_cfg.moe is not None:
            check_moe_mesh(model_cfg, mesh)
        self.model_cfg = model_cfg
        self.tx = tx = make_optimizer(tcfg)
        self.abstract, self.shardings = state_shardings(model_cfg, tx, mesh)
        self.train_it = make_text_dataset(
            exp.data,
            tok,
            "train",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        st = self.train_it.stats
        if st.get("streaming"):
            log(
                f"data: streamed from {exp.data.source} ({st.get('bytes') or 0:,} bytes), read "
                f"lazily in rows of {exp.data.seq_len} (packing: nothing truncated or dropped)"
            )
        else:
            log(
                f"data: {st['documents']} documents, {st['tokens']} tokens, {st['rows']} rows of "
                f"{exp.data.seq_len} per epoch; {st['split_documents']} documents longer than "
                "the rest of their row continue in the next row (packing: nothing truncated or "
                "dropped)"
            )
        self.bsh = bsh = batch_sharding(mesh, 2, exp.data.batch_size)
        self.to_global = _to_global_fn(bsh)
        self.step_fn = jit_train_step(model_cfg, tcfg, tx, self.shardings, bsh)
        if tcfg.print_memory:
            log(memory_report(self.step_fn, self.abstract, exp.data.batch_size,
                              exp.data.seq_len, bsh))  # fmt: skip
        self.flops_tok = flops_per_token(model_cfg, exp.data.seq_len)
        self.peak = tcfg.peak_flops or device_peak_flops() or 0.0
        self.bad_fn = (
            jit_train_step(model_cfg, tcfg, tx, self.shardings, bsh, inject_nonfinite=True)
            if exp.debug_nonfinite_step >= 0
            else None
        )
        self.eval_fn = jit_eval_step(model_cfg, tcfg, self.shardings.params, bsh)
        self.byte_lens = token_byte_lengths(tok, model_cfg.vocab_size)
        self.rng = jax.random.key(tcfg.seed + 1)
        self._batch: dict = {}
        self.batches = (
            Prefetcher(self.train_it, self.to_global, tcfg.prefetch_batches)
            if tcfg.prefetch_batches
            else None
        )

    def abstract_state(self):
        return self.abstract, self.shardings

    def init_state(self):
        return init_train_state(self.model_cfg, self.tx, self.mesh, self.exp.train.seed)[0]

    def meta(self) -> dict:
        return meta_dict(self.model_cfg, self.exp.train, self.exp.data)

    def host_state(self) -> dict:
        return (self.batches or self.train_it).get_state()

    def set_host_state(self, state: dict) -> None:
        (self.batches or self.train_it).set_state(state)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()

    def describe(self, state) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        tok = self.tok
        return (
            f"model: {n / 1e6:.2f}M params, mesh {dict(self.mesh.shape)}, "
            f"tokenizer {tok.kind} (vocab {tok.vocab_size})"
        )

    def train_step(self, state, step: int):
        if self.batches is not None:
            batch, self._batch = next(self.batches)
        else:
            self._batch = next(self.train_it)
            batch = self.to_global(self._batch)
        exp = self.exp
        bad = 0 <= step - exp.debug_nonfinite_step < exp.debug_nonfinite_count
        fn = self.bad_fn if bad else self.step_fn
        return fn(state, batch, self.rng)

    def rates(self, window: dict) -> dict:
        if not (self.peak and window["seconds"]):
            return {}
        tps = window["tokens"] / window["seconds"]
        return {"mfu": tps * self.flops_tok / (self.peak * jax.device_count())}

    def step_record(self, step: int, metrics: dict, state) -> dict:
        return _step_record(step, metrics, self._batch, state)

    def evaluate(self, state, step: int) -> dict:
        out = evaluate(state.params, self.exp, self.tok, self.eval_fn, self.to_global,
                       self.byte_lens)  # fmt: skip
        return {f"eval/{k}": v for k, v in out.items()}


def train(exp: Experiment, log=print) -> dict:
    """Run (or resume) pretraining on the one loop (`engine.run`); returns the final metrics."""
    task = PretrainTask(exp, log)
    res = engine.run(task, exp.train, log)
    return {
        "step": res.step,
        "finished": res.finished,
        "eval": {k.removeprefix("eval/"): v for k, v in res.eval.items()},
        "train": res.train,
        "state": res.state,
        "model_config": task.model_cfg,
        "tokenizer": task.tok,
    }


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


def _step_record(step: int, m: dict, batch: dict, state) -> dict:
    loss = float(m["loss"])
    ids, counts = np.unique(batch.get("example_ids", np.zeros((0,), np.int32)), return_counts=True)
    keep = ids >= 0
    return dict(
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


__all__ = ["Experiment", "PretrainTask", "TrainingHalted", "evaluate", "sample_text", "train"]


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
    model_cfg, params, tok = load_model(exp.train.workdir)
    mesh = make_mesh(exp.train.mesh)
    bsh = batch_sharding(mesh, 2, exp.data.batch_size)
    p_sh = params_shardings(abstract_params(model_cfg), mesh)
    eval_fn = jit_eval_step(model_cfg, exp.train, p_sh, bsh)
    byte_lens = token_byte_lengths(tok, model_cfg.vocab_size)
    return evaluate(params, exp, tok, eval_fn, _to_global_fn(bsh), byte_lens)
