"""BIG-bench multiple-choice JSON tasks, scored natively and through lm-evaluation-harness.

A task folder holds `task.json` (or `task_mc.json`) with `examples` of `input` and
`target_scores` ({choice: score}); a task without examples of its own is the union of its
subtask folders (e.g. `hhh_alignment` = harmless + helpful + honest + other). Each example
becomes one document:

  prompt  = input_prefix + input + output_prefix (the task's `example_input_prefix` /
            `example_output_prefix`, BIG-bench's defaults "Q: " / "\\nA: "), trailing space cut
  choices = the `target_scores` keys in file order, each scored as " " + choice
  gold    = the first choice with the highest score

acc = mean[argmax_k log p(choice_k | prompt) == gold]; acc_norm divides each log-likelihood by
the choice's length in characters first (lm-eval's definition). `write_lm_eval_tasks` writes the
same documents as local lm-eval task configs (`dataset_path: json`), so the harness needs no hub
download. BIG-bench files carry a canary string: evaluate on them, never train on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from lm_jax.errors import EvalError

TARGET_DELIMITER = " "
TASK_FILES = ("task.json", "task_mc.json")


def _task_file(folder: str) -> str | None:
    for name in TASK_FILES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    return None


def _docs_of(path: str, subtask: str) -> list[dict]:
    with open(path) as f:
        task = json.load(f)
    pre_in = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
    pre_out = task.get("example_output_prefix", "\nA: ")
    docs = []
    for ex in task.get("examples", []):
        scores = ex.get("target_scores")
        if not scores:
            continue  # a generative example: not multiple choice
        choices = [str(c) for c in scores]
        vals = [float(v) for v in scores.values()]
        prompt = task.get("task_prefix", "") + pre_in + ex["input"] + pre_out
        docs.append(
            {
                "prompt": prompt.rstrip(" "),
                "choices": choices,
                "gold": int(np.argmax(vals)),
                "subtask": subtask,
            }
        )
    return docs


def load_bigbench(root: str, name: str) -> list[dict]:
    """Multiple-choice documents of task `name` ('truthful_qa', 'logical_deduction/three_objects',
    'hhh_alignment', ...) under `root` (e.g. ../shared/data/bigbench)."""
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        have = sorted(d for d in os.listdir(root)) if os.path.isdir(root) else []
        raise EvalError(
            f"no BIG-bench task {name!r} in {root}: pick one of {have} (or fix --data_dir)"
        )
    docs = []
    path = _task_file(folder)
    if path is not None:
        docs = _docs_of(path, name)
    if not docs:  # a parent task: its subtasks
        for sub in sorted(os.listdir(folder)):
            p = _task_file(os.path.join(folder, sub))
            if p is not None:
                docs += _docs_of(p, f"{name}/{sub}")
    if not docs:
        raise EvalError(f"BIG-bench task {name!r} has no multiple-choice examples (target_scores)")
    return docs


def requests_of(docs: Sequence[dict]) -> list[tuple[str, str]]:
    """(context, continuation) pairs, every choice of every document in order."""
    return [(d["prompt"], TARGET_DELIMITER + c) for d in docs for c in d["choices"]]


def mc_metrics(docs: Sequence[dict], logliks: Sequence[float]) -> dict:
    """acc and acc_norm from the log-likelihoods of `requests_of(docs)` (same order)."""
    ll = np.asarray(logliks, np.float64)
    acc, acc_norm, i = [], [], 0
    for d in docs:
        k = len(d["choices"])
        x = ll[i : i + k]
        i += k
        lens = np.asarray([len(c) for c in d["choices"]], np.float64)
        acc.append(int(np.argmax(x)) == d["gold"])
        acc_norm.append(int(np.argmax(x / lens)) == d["gold"])
    if i != len(ll):
        raise EvalError(f"{len(ll)} log-likelihoods for {i} choices")
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(docs)}


def lm_eval_task_name(name: str) -> str:
    return "lm_jax_bigbench_" + name.replace("/", "_")


def write_lm_eval_tasks(root: str, names: Sequence[str], out_dir: str, limit=None) -> list[str]:
    """Write `<out_dir>/<task>.jsonl` + `.yaml` (lm-eval local multiple-choice configs) for each
    BIG-bench task in `names`; returns the lm-eval task names (pass `--include_path out_dir`)."""
    os.makedirs(out_dir, exist_ok=True)
    tasks = []
    for name in names:
        docs = load_bigbench(root, name)[:limit]
        task = lm_eval_task_name(name)
        data = os.path.abspath(os.path.join(out_dir, task + ".jsonl"))
        with open(data, "w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
        yaml = "\n".join(
            [
                f"task: {task}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(data)}",
                "test_split: test",
                "output_type: multiple_choice",
                "doc_to_text: prompt",
                "doc_to_choice: choices",
                "doc_to_target: gold",
                f"target_delimiter: {json.dumps(TARGET_DELIMITER)}",
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "  - metric: acc_norm",
                "    aggregation: mean",
                "    higher_is_better: true",
                "metadata:",
                "  version: 1.0",
                "",
            ]
        )
        with open(os.path.join(out_dir, task + ".yaml"), "w") as f:
            f.write(yaml)
        tasks.append(task)
    return tasks
