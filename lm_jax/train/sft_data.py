"""Fine-tuning data and label scoring: (prompt, completion) examples, row encoding with a
completion-only loss mask, resumable shuffled epochs, JSONL and SST-2 readers, and
classification by label-word likelihood through the one scorer (`lm_jax.scoring.Scorer`).

Rows are `prompt ids + completion ids` (prompt encoded with the tokenizer's special tokens,
completion without, exactly as label scoring does), right-padded to `FinetuneConfig.seq_len`
(or, with `length_multiple`, to the batch's longest row rounded up to it): segment ids are 1 on
real tokens and 0 on padding, and `loss_mask` is 1 only where the *target* is a completion
token. Too-long prompts lose their oldest tokens. An encoded row is (ids, n_prompt) or (ids,
target mask [n - 1]) (chat rows, `lm_jax.train.chat_data`).

Packing (`FinetuneConfig.pack`, `PackedSFTBatches`, `make_packed_batch`): several examples
share a row, example j with segment id j and positions restarting at 0, so the model's segment
masking keeps them apart (and no example predicts the next one's first token): each example's
loss is the same as alone in a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from lm_jax import adapters as lora_lib
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.eval.classification import classification_metrics
from lm_jax.eval.tasks import DEFAULT_DATA_DIR, SST2_OPTIONS, load_sst2, sst2_prompt
from lm_jax.scoring import Scorer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.jsonl import jsonl_objects
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
    pack: bool = False  # several examples per row (segment ids 1, 2, ..; positions restart)
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


def target_mask(row) -> np.ndarray:
    """[n - 1] float32 loss mask over the targets ids[1:] of an encoded row: (ids, n_prompt)
    (loss on the targets ids[n_prompt:]) or (ids, target mask) as chat rows carry."""
    ids, m = row
    if isinstance(m, np.ndarray):
        return m
    out = np.zeros(len(ids) - 1, np.float32)
    out[m - 1 :] = 1.0
    return out


def make_packed_batch(
    rows: Sequence[Sequence[tuple]],
    seq_len: int,
    length_multiple: int = 0,
    n_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """rows[b]: the encoded examples packed into row b, in order. Example j of a row takes the
    next len(ids) - 1 positions with segment id j + 1 and positions 0, 1, .. (so it attends to
    itself only and never predicts another's first token); right padding has segment id 0.
    T = seq_len, or with `length_multiple` the longest row rounded up to it; `n_rows` pads
    with empty rows. {inputs, targets, positions, segment_ids: [B, T] int32, loss_mask [B, T]}."""
    B = len(rows) if n_rows is None else n_rows
    longest = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    if longest > seq_len:
        raise ValueError(f"a packed row of {longest} tokens exceeds seq_len {seq_len}.")
    T = seq_len if not length_multiple else min(seq_len, _round_up(longest, length_multiple))
    out = {k: np.zeros((B, T), np.int32) for k in BATCH_KEYS}
    out["loss_mask"] = np.zeros((B, T), np.float32)
    for b, row in enumerate(rows):
        t = 0
        for j, ex in enumerate(row, 1):
            ids = ex[0]
            n = len(ids) - 1
            out["inputs"][b, t : t + n] = ids[:-1]
            out["targets"][b, t : t + n] = ids[1:]
            out["positions"][b, t : t + n] = np.arange(n)
            out["segment_ids"][b, t : t + n] = j
            out["loss_mask"][b, t : t + n] = target_mask(ex)
            t += n
    return out


def make_batch(
    encoded: Sequence[tuple],
    seq_len: int,
    length_multiple: int = 0,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """One example per right-padded row (`make_packed_batch`); loss only on completion targets
    (or a chat row's target mask); `rows` pads with empty rows."""
    return make_packed_batch([[e] for e in encoded], seq_len, length_multiple, rows)


class SFTBatches:
    """Shuffled epochs over encoded examples; every example once per epoch; resumable state."""

    packed = False  # one example per row

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
        return self.collate(picked)

    def collate(self, indices: list[int]) -> dict[str, np.ndarray]:
        """The host batch of the examples at `indices` (subclasses: other row layouts)."""
        picked = [self.encoded[i] for i in indices]
        return make_batch(picked, self.cfg.seq_len, self.cfg.length_multiple)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        check_packing(state, self.packed)
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(
                f"the checkpoint's data order has seed {state['seed']}, this run {self.seed}: "
                "rerun with the saved --train.seed or start a new --train.workdir."
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class PackedSFTBatches(SFTBatches):
    """`SFTBatches` with several examples per row (`FinetuneConfig.pack`): each of the
    `batch_size` rows takes the next examples of the shuffled epoch while they fit its
    `seq_len` positions (an example that does not fit starts the next row; epochs run on
    across rows). Every example once per epoch, in the same order; resumable state."""

    packed = True

    def __next__(self) -> dict[str, np.ndarray]:
        order, rows = self._order(), []
        for _ in range(self.cfg.batch_size):
            row: list[int] = []
            used = 0
            while True:
                if self.index >= len(order):
                    self.epoch, self.index = self.epoch + 1, 0
                    order = self._order()
                j = int(order[self.index])
                n = len(self.encoded[j][0]) - 1
                if row and used + n > self.cfg.seq_len:
                    break
                row.append(j)
                used += n
                self.index += 1
            rows.append(row)
        self.last_indices = [j for row in rows for j in row]
        self.last_rows = rows
        return make_packed_batch([[self.encoded[j] for j in row] for row in rows],
                                 self.cfg.seq_len, self.cfg.length_multiple)  # fmt: skip

    def get_state(self) -> dict:
        return {**super().get_state(), "packed": True}


def check_packing(state: dict, packed: bool) -> None:
    """ConfigError unless a saved data state was made with the same `pack` setting."""
    if bool(state.get("packed", False)) != packed:
        was = "with" if state.get("packed") else "without"
        raise ConfigError(
            f"the checkpoint's data order was made {was} packing: rerun with "
            f"--finetune.pack={'true' if state.get('packed') else 'false'} or start a new "
            "--train.workdir."
        )


def read_jsonl(path: str) -> list[Example]:
    """{"prompt": ..., "completion": ...} per line (`lm_jax.train.jsonl`: errors name the line)."""
    out = [
        Example(str(d["prompt"]), str(d["completion"]))
        for _, d in jsonl_objects(path, ("prompt", "completion"))
    ]
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
