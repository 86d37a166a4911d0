"""GRPO's inputs: its config, prompts ({prompt, answer?} JSONL, BIG-bench task files for
evaluation, or generated arithmetic problems), which prompts a step uses, and the text rewards.

Prompts of a step are a pure function of (seed, step): prompt slot i = step * P + j (P prompts
per step) reads entry i mod N of the epoch-(i // N) permutation of the N prompts, so every
prompt comes once per epoch and a resumed run needs no host state to draw the same prompts.

Rewards are plain Python callables over decoded text:
  RewardFn(prompts: list[str], completions: list[str], answers: list[str | None]) -> [B] float
`arith_exact`: 1.0 where the first integer in the completion equals the answer (BIG-bench's
`output_regex` `[-+]?\\d+`), else 0.0. Feature rewards (`wholeword:you`, ...) are made in
`lm_jax.align.rewards` (the alignment features live there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from lm_jax import adapters as lora_lib
from lm_jax.configs.base import ConfigError
from lm_jax.data.chat_template import BUILTIN_TEMPLATES
from lm_jax.losses_rl import default_scale_rewards
from lm_jax.train.jsonl import check_strings, jsonl_objects

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence], np.ndarray]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """What GRPO adds to `TrainConfig` (`--posttrain.<field>` with --method=grpo)."""

    method: Literal["grpo"] = "grpo"
    num_generations: int = 8  # G completions per prompt (one group)
    prompts_per_step: int = 4  # P prompts per step: P * G sampled rows
    num_iterations: int = 1  # mu: clipped updates on each sampled batch
    epsilon: float = 0.2  # clip range: ratio in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon (DAPO's clip-higher when larger)
    beta: float = 0.04  # weight of the k3 KL to the reference; 0 = no reference pass
    kl_bias_correction: bool = True  # k3 KL weighted by the ratio (TRL 1.16's default)
    loss_type: Literal["grpo", "dr_grpo", "bnpo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] | None = None  # None: dr_grpo none, else group
    reward: str = "arith_exact"  # arith_exact | wholeword:WORD | word:WORD | regex:PATTERN
    max_new_tokens: int = 16  # completion budget (dr_grpo's max_completion_length)
    temperature: float = 1.0  # sampling temperature (log-probs are taken at it, as TRL does)
    prompt_len: int = 48  # prompt tokens kept (the oldest are cut)
    # None: prompts as plain text; else each prompt is a user turn rendered for the reply by
    # this chat template ('' = the tokenizer's own; chatml | llama3 | gemma)
    chat_template: str | None = None
    lora: lora_lib.LoraConfig | None = None  # None = full-parameter training
    bf16_base: bool = False  # LoRA: frozen base weights in bfloat16
    eval_examples: int = 0  # held-out prompts per evaluation (greedy); 0 = all of them
    eval_batch_size: int = 32  # prompts per greedy evaluation pass
    export_peft: bool = False  # LoRA: also write a peft folder to workdir/peft
    save: bool = True  # write checkpoints

    def __post_init__(self):
        for name in ("num_generations", "prompts_per_step", "num_iterations", "max_new_tokens",
                     "prompt_len", "eval_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_generations < 2:
            raise ConfigError(
                "num_generations must be >= 2: advantages compare completions of one prompt."
            )
        if not 0.0 < self.epsilon < 1.0:
            raise ConfigError(f"epsilon must be in (0, 1), got {self.epsilon}.")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ConfigError(f"epsilon_high must be > 0, got {self.epsilon_high}.")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}.")
        if not self.temperature > 0:
            raise ConfigError(
                f"temperature must be > 0 (GRPO samples), got {self.temperature}."
            )
        if self.eval_examples < 0:
            raise ConfigError(f"eval_examples must be >= 0, got {self.eval_examples}.")
        if self.lora is None and (self.bf16_base or self.export_peft):
            raise ConfigError(
                "bf16_base and export_peft apply to LoRA only: set a LoRA rank (lora.rank > 0) "
                "or drop them for full-parameter training."
            )
        check_reward_spec(self.reward)
        if self.chat_template and self.chat_template not in BUILTIN_TEMPLATES:
            raise ConfigError(
                f"unknown chat template {self.chat_template!r}: choose one of "
                f"{sorted(BUILTIN_TEMPLATES)}, or '' for the tokenizer's own."
            )

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def scale_rewards_(self) -> str:
        s = self.scale_rewards
        return default_scale_rewards(self.loss_type) if s is None else s

    @property
    def epsilon_high_(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"] = self.lora.to_dict() if self.lora is not None else None
        return d


FEATURE_KINDS = ("word", "wholeword", "regex")


ANSWER_REWARDS = ("arith_exact", "arith_last")  # rewards that read each prompt's answer


def check_reward_spec(spec: str) -> None:
    """ConfigError unless `spec` names a known reward (before any model is loaded)."""
    if spec in ANSWER_REWARDS:
        return
    kind, sep, rest = spec.partition(":")
    if kind in FEATURE_KINDS and sep and rest:
        return
    raise ConfigError(
        f"unknown reward {spec!r}: use arith_exact, arith_last, wholeword:WORD, word:WORD or "
        "regex:PATTERN."
    )


# --------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    prompt: str
    answer: str | None = None


def read_prompts_jsonl(path: str) -> list[Prompt]:
    """{"prompt": ..., "answer"?: ...} per line (strings; prompts non-empty). A BIG-bench
    `task.json` ({"examples": [{"input", "target"}]}) is read too (for evaluation)."""
    if path.endswith(".json"):
        return read_bigbench(path)
    out = []
    for where, d in jsonl_objects(path, ("prompt",), "prompt"):
        check_strings(where, d, ("prompt",))
        if not d["prompt"].strip():
            raise ConfigError(f"{where}: 'prompt' is empty; every line needs a prompt.")
        ans = d.get("answer")
        if ans is not None and not isinstance(ans, (str, int)):
            raise ConfigError(f"{where}: 'answer' must be a string or an int.")
        out.append(Prompt(d["prompt"], None if ans is None else str(ans)))
    if not out:
        raise ConfigError(f"{path} holds no prompts.")
    return out


def read_prompt_files(paths: str, limit: int = 0, seed: int = 0) -> list[Prompt]:
    """The prompts of comma-separated files (`read_prompts_jsonl` each), concatenated; with
    `limit`, a seeded sample of `limit` of them (in file order), so every file is represented."""
    out = [p for path in paths.split(",") if path for p in read_prompts_jsonl(path)]
    if limit and limit < len(out):
        keep = np.sort(np.random.default_rng([seed, 4099]).choice(len(out), limit, replace=False))
        out = [out[i] for i in keep]
    return out


def arith_prompt(question: str) -> str:
    """The prompt of an arithmetic question ("What is 3 plus 4?")."""
    return f"Q: {question}\nA:"


def read_bigbench(path: str) -> list[Prompt]:
    """A BIG-bench task.json as prompts (its input wrapped by `arith_prompt`, target = answer)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BIG-bench task file {path!r} not found.")
    try:
        with open(path, encoding="utf-8") as f:
            examples = json.load(f)["examples"]
        return [Prompt(arith_prompt(e["input"]), str(e["target"])) for e in examples]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a BIG-bench task file ({e}).") from None


def arithmetic_problems(n: int, seed: int = 0, exclude: Sequence[Prompt] = ()) -> list[Prompt]:
    """`n` distinct 1- and 2-digit addition / subtraction problems in BIG-bench's wording
    ("What is 12 minus 7?"), none of them in `exclude`."""
    rng = np.random.default_rng([seed, 1729])
    seen = {p.prompt for p in exclude}
    out: list[Prompt] = []
    space = 2 * (10 * 10 + 100 * 100)
    if n > space - len(seen):
        raise ConfigError(f"only {space - len(seen)} distinct arithmetic problems remain, not {n}.")
    while len(out) < n:
        hi = 10 if rng.random() < 0.5 else 100
        a, b = (int(x) for x in rng.integers(0, hi, 2))
        op = "plus" if rng.random() < 0.5 else "minus"
        p = arith_prompt(f"What is {a} {op} {b}?")
        if p in seen:
            continue
        seen.add(p)
        out.append(Prompt(p, str(a + b if op == "plus" else a - b)))
    return out


def step_indices(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Prompt indices of step `step` (0-based): the module docstring's pure rule."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        order = np.random.default_rng([seed, i // n]).permutation(n)
        out.append(int(order[i % n]))
    return out


# --------------------------------------------------------------------------- rewards

_INT = re.compile(r"[-+]?\d+")


def _answer_match(completions, answers, name: str, pick) -> np.ndarray:
    out = np.zeros(len(completions), np.float32)
    for i, (c, a) in enumerate(zip(completions, answers)):
        if a is None:
            raise ConfigError(f"reward {name} needs an 'answer' for every prompt.")
        got = pick(c)
        out[i] = float(got is not None and int(got) == int(a))
    return out


def arith_exact(prompts, completions, answers) -> np.ndarray:
    """1.0 where the completion's first integer equals the answer (none: 0.0), [B]: the
    strict reading (BIG-bench's exact match of the target after "A:")."""
    first = lambda c: (m.group() if (m := _INT.search(c)) else None)  # noqa: E731
    return _answer_match(completions, answers, "arith_exact", first)


def arith_last(prompts, completions, answers) -> np.ndarray:
    """1.0 where the last integer of the completion's first non-empty line equals the answer,
    [B]: a flexible extraction (like lm-eval's gsm8k "flexible-extract") that credits a worked
    answer ("3 + 4 = 7") the strict reading scores 0."""

    def last(c):
        line = next((x for x in c.strip().splitlines() if x.strip()), "")
        found = _INT.findall(line)
        return found[-1] if found else None

    return _answer_match(completions, answers, "arith_last", last)
