"""Preference data: {prompt, chosen, rejected} pairs, their token rows, batches, and a default
set of pairs made from any text source (offline: the embedded Shakespeare corpus).

Rows. A pair becomes two rows, `prompt + chosen` and `prompt + rejected`, encoded as fine-tuning
rows are (`lm_jax.train.sft_data.make_batch`): the prompt with the tokenizer's special tokens,
completions without (EOS appended with `add_eos`), right-padded, `loss_mask` 1 exactly where the
target is a completion token, so the scorer's masked sums are log p(completion | prompt).
Truncation, with a row budget of `seq_len + 1` tokens (seq_len inputs, targets shifted by one):
  1. prompt + the longer completion fits: nothing is cut;
  2. else the prompt loses its oldest tokens, keeping at least max(1, seq_len // 2) of them (or
     all, if it is shorter); both rows keep the same prompt tokens;
  3. a completion that still does not fit loses its end.
An empty prompt or completion (nothing after tokenizing) is an error naming the pair.

Batches: {"chosen": rows [B, T], "rejected": rows [B, T]} (one T for both, so the policy scores
them in one [2B, T] pass) plus, for DPO / IPO, "ref_chosen" / "ref_rejected" [B] float32: the
reference log-probs cached for each pair. `PreferenceBatches` are `SFTBatches` (shuffled
epochs, every pair once per epoch, resumable host state) over pairs.

Default pairs (`text_pairs`): within a passage of a text source, prompt = one line of verse or
prose, chosen = the line that follows it, rejected = that line with its words shuffled (a fixed
seed). A fluent continuation beats a scrambled one: a preference every base model can learn
and be measured on (held-out pairs come from the source's validation split).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from lm_jax import adapters as lora_lib
from lm_jax.configs.base import ConfigError
from lm_jax.data import load_texts
from lm_jax.losses_preference import DEFAULT_BETA, DEFAULT_GAMMA
from lm_jax.train.jsonl import check_strings, jsonl_objects
from lm_jax.train.sft_data import BATCH_KEYS, FinetuneConfig, SFTBatches, _encode, make_batch


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """What preference optimisation adds to `TrainConfig` (`--posttrain.<field>`)."""

    method: Literal["dpo", "ipo", "simpo", "sft"] = "dpo"  # sft: fine-tune on the chosen ones
    beta: float | None = None  # None: 0.1 for dpo and ipo, 2.0 for simpo
    gamma: float | None = None  # simpo's target reward margin; None: 1.0
    label_smoothing: float = 0.0  # dpo / simpo: share of flipped labels assumed (cDPO)
    seq_len: int = 128  # T: row budget (prompt + completion), truncated as the module says
    batch_size: int = 8  # preference pairs per step (2x rows)
    length_multiple: int = 0  # pad to the batch's longest rounded up to this; 0 = always seq_len
    lora: lora_lib.LoraConfig | None = None  # None = full-parameter training
    bf16_base: bool = False  # LoRA: frozen base weights in bfloat16
    add_eos: bool = False  # append the tokenizer's EOS to every completion
    eval_examples: int = 0  # held-out pairs per evaluation; 0 = all of them
    eval_batch_size: int = 32  # rows per scoring pass (reference and evaluation)
    export_peft: bool = False  # LoRA: also write a peft folder to workdir/peft
    save: bool = True  # write checkpoints (and the reference cache)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}.")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("batch_size and eval_batch_size must be >= 1.")
        if self.length_multiple < 0:
            raise ConfigError(f"length_multiple must be >= 0, got {self.length_multiple}.")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.gamma is not None and self.method != "simpo":
            raise ConfigError(f"gamma is SimPO's margin: drop it for method {self.method!r}.")
        if self.label_smoothing and self.method not in ("dpo", "simpo"):
            raise ConfigError(
                f"label_smoothing applies to dpo and simpo only: drop it for {self.method!r}."
            )
        if self.method == "sft" and self.beta is not None:
            raise ConfigError("beta has no meaning for method 'sft': drop it.")
        if self.lora is None and (self.bf16_base or self.export_peft):
            raise ConfigError(
                "bf16_base and export_peft apply to LoRA only: set a LoRA rank (lora.rank > 0) "
                "or drop them for full-parameter training."
            )

    @property
    def beta_(self) -> float:
        return DEFAULT_BETA.get(self.method, 0.0) if self.beta is None else self.beta

    @property
    def gamma_(self) -> float:
        return DEFAULT_GAMMA if self.gamma is None else self.gamma

    def finetune_config(self) -> FinetuneConfig:
        """The same run as supervised fine-tuning (method 'sft': on the chosen completions)."""
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**{k: getattr(self, k) for k in names if hasattr(self, k)})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"] = self.lora.to_dict() if self.lora is not None else None
        return d


# --------------------------------------------------------------------------- reading

KEYS = ("prompt", "chosen", "rejected")


def read_preference_jsonl(path: str) -> list[PreferencePair]:
    """{"prompt": ..., "chosen": ..., "rejected": ...} per line (strings; completions non-empty)."""
    out = []
    for where, d in jsonl_objects(path, KEYS, "preference"):
        check_strings(where, d, KEYS)
        for k in KEYS[1:]:
            if not d[k]:
                raise ConfigError(
                    f"{where}: {k!r} is empty; every pair needs two non-empty completions."
                )
        out.append(PreferencePair(d["prompt"], d["chosen"], d["rejected"]))
    if not out:
        raise ConfigError(f"{path} holds no preference pairs.")
    return out


_SPEAKER = re.compile(r"^[A-Z][A-Z' .,-]*\.?$")  # "POSTHUMUS." / "FIRST LORD."


def _lines(text: str) -> list[list[str]]:
    """Passages (blank-line separated) as lists of text lines, speaker names dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and not _SPEAKER.match(ln)]
        if len(lines) >= 2:
            out.append(lines)
    return out


def text_pairs(
    source: str = "shakespeare",
    split: str = "train",
    n: int = 512,
    seed: int = 0,
    min_words: int = 4,
    max_words: int = 14,
) -> list[PreferencePair]:
    """`n` pairs (fewer if the source has fewer) from consecutive lines of `source` (any
    `lm_jax.data` text source): prompt = a line + newline, chosen = the next line, rejected =
    the next line's words shuffled. Lines of `min_words`..`max_words` words; deterministic in
    (source, split, n, seed)."""
    cands = []
    for _, text in load_texts(source, split):
        for lines in _lines(text):
            for a, b in zip(lines, lines[1:]):
                if all(min_words <= len(x.split()) <= max_words for x in (a, b)):
                    cands.append((a, b))
    if not cands:
        raise ConfigError(
            f"text source {source!r} ({split}) has no consecutive lines of {min_words}-{max_words} "
            "words to make preference pairs from: give --train_file."
        )
    rng = np.random.default_rng(seed)
    out = []
    for j in rng.permutation(len(cands))[:n]:
        prompt, chosen = cands[j]
        words = chosen.split()
        shuffled = words
        while shuffled == words:  # >= 4 words: some order differs
            shuffled = [words[k] for k in rng.permutation(len(words))]
        out.append(PreferencePair(prompt + "\n", chosen, " ".join(shuffled)))
    return out


# --------------------------------------------------------------------------- rows and batches


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    chosen: tuple[np.ndarray, int]  # (ids [n] int32, prompt tokens), as sft_data rows
    rejected: tuple[np.ndarray, int]
    truncated: bool  # the prompt or a completion was cut to fit seq_len


def encode_pair(tokenizer, pair: PreferencePair, seq_len: int, add_eos: bool = False):
    """`EncodedPair`: both rows of `pair` within `seq_len + 1` tokens (the module's rules)."""
    prompt = _encode(tokenizer, pair.prompt, True)
    comps = [_encode(tokenizer, pair.chosen, False), _encode(tokenizer, pair.rejected, False)]
    if add_eos:
        if tokenizer.eos_id is None:
            raise ConfigError("add_eos needs a tokenizer with an EOS token.")
        comps = [c + [int(tokenizer.eos_id)] for c in comps]
    if not prompt:
        raise ConfigError(f"prompt {pair.prompt!r} tokenizes to nothing: give every pair one.")
    for name, c, text in zip(("chosen", "rejected"), comps, (pair.chosen, pair.rejected)):
        if not c:
            raise ConfigError(
                f"{name} completion {text!r} (prompt {pair.prompt[:40]!r}) tokenizes to nothing: "
                "every pair needs two non-empty completions."
            )
    room, keep = seq_len + 1, len(prompt)
    longest = max(len(c) for c in comps)
    if keep + longest > room:  # rule 2: the prompt's oldest tokens go first, down to a floor
        keep = min(len(prompt), max(room - longest, max(1, seq_len // 2)))
    cut = [c[: room - keep] for c in comps]  # rule 3: then the completions' ends
    truncated = keep < len(prompt) or longest > room - keep
    rows = [(np.asarray(prompt[len(prompt) - keep :] + c, np.int32), keep) for c in cut]
    return EncodedPair(rows[0], rows[1], truncated)


def make_pair_batch(
    encoded: Sequence[EncodedPair],
    seq_len: int,
    length_multiple: int = 0,
    refs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """{"chosen": rows [B, T], "rejected": rows [B, T]} (+ "ref_chosen", "ref_rejected" [B]
    float32 from `refs`, the [B] reference log-probs of these pairs)."""
    B = len(encoded)
    rows = make_batch([e.chosen for e in encoded] + [e.rejected for e in encoded], seq_len,
                      length_multiple)  # fmt: skip
    out = {
        "chosen": {k: rows[k][:B] for k in BATCH_KEYS},
        "rejected": {k: rows[k][B:] for k in BATCH_KEYS},
    }
    if refs is not None:
        out["ref_chosen"] = np.asarray(refs[0], np.float32)
        out["ref_rejected"] = np.asarray(refs[1], np.float32)
    return out


class PreferenceBatches(SFTBatches):
    """Shuffled epochs over encoded pairs (`SFTBatches`), batched by `make_pair_batch`;
    `refs`: (chosen [N], rejected [N]) reference log-probs of every pair, or None (SimPO)."""

    def __init__(self, encoded: Sequence[EncodedPair], cfg: PreferenceConfig, seed: int = 0,
                 refs: tuple[np.ndarray, np.ndarray] | None = None):  # fmt: skip
        if not encoded:
            raise ConfigError("no preference pairs to train on.")
        super().__init__(list(encoded), cfg, seed)
        self.refs = refs

    def collate(self, indices: list[int]) -> dict:
        refs = None
        if self.refs is not None:
            refs = (self.refs[0][indices], self.refs[1][indices])
        return make_pair_batch([self.encoded[i] for i in indices], self.cfg.seq_len,
                               self.cfg.length_multiple, refs)  # fmt: skip
