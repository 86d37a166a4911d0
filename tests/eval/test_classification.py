"""Classification metrics (scikit-learn), option log-likelihood scoring, the classification head,
tasks and bad input."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics

from lm_jax.configs import ModelConfig
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.eval.classification import (
    classification_metrics,
    extract_features,
    option_loglikelihoods,
    train_head,
)
from lm_jax.eval.perplexity import EvalError
from lm_jax.eval.tasks import REPO, get_task, load_sst2, run_task, sst2_prompt
from lm_jax.nn.transformer import Transformer
from lm_jax.sequence_scoring import continuation_logprobs


@pytest.fixture(scope="module")
def byte_model():
    cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=4, max_len=64)
    params = Transformer(cfg).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, nn.unbox(params)


def test_metrics_equal_sklearn():
    y = [0, 1, 1, 0, 1, 2, 2, 0]
    p = [0, 1, 0, 0, 2, 2, 1, 1]
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(metrics.f1_score(y, p, average="macro"))
    assert m["precision"] == pytest.approx(metrics.precision_score(y, p, average="macro"))
    assert m["recall"] == pytest.approx(metrics.recall_score(y, p, average="macro"))
    with pytest.raises(EvalError, match="8 labels but 7 predictions"):
        classification_metrics(y, p[:-1])
    with pytest.raises(EvalError, match="empty"):
        classification_metrics([], [])


def test_option_loglikelihood_equals_per_sequence_scoring(byte_model):
    cfg, params = byte_model
    tok = ByteTokenizer()
    prompts = ["I loved it. It was", "Terrible film, so", "meh"]
    options = [" good", " bad!", " ok"]  # multi-token options: the batched general path
    ll, cnt = option_loglikelihoods(cfg, params, tok, prompts, options, batch_size=4)
    assert cnt.tolist() == [[5, 5, 3]] * 3
    for i, p in enumerate(prompts):
        for k, o in enumerate(options):
            want = continuation_logprobs(cfg, params, [tok.encode(p)], [tok.encode(o)])
            assert ll[i, k] == pytest.approx(float(np.sum(want)), rel=1e-5, abs=1e-5)
    # single-token options: the one-forward-per-prompt path equals the general path
    fast, _ = option_loglikelihoods(cfg, params, tok, prompts, ["+", "-"], batch_size=2)
    slow, _ = option_loglikelihoods(
        cfg, params, tok, prompts, ["+", "-"], single_token_fast_path=False
    )
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    with pytest.raises(EvalError, match="empty"):
        option_loglikelihoods(cfg, params, tok, [], options)


def test_head_learns_from_features(byte_model):
    cfg, params = byte_model
    tok = ByteTokenizer()
    texts = ["aaaa " * (1 + i % 3) for i in range(20)] + ["zzzz " * (1 + i % 3) for i in range(20)]
    labels = np.array([0] * 20 + [1] * 20)
    feats = extract_features(cfg, params, tok, texts, batch_size=16)
    assert feats.shape == (40, cfg.d_model)
    last = extract_features(cfg, params, tok, texts[:3], pool="last", batch_size=4)
    _, hidden = Transformer(cfg).apply(
        {"params": params}, jnp.asarray([tok.encode(texts[0])]), return_hidden=True
    )
    np.testing.assert_allclose(last[0], hidden[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats[0], hidden[0].mean(0), rtol=1e-5, atol=1e-5)
    head = train_head(feats, labels, 2, steps=50)
    assert (head.predict(feats) == labels).mean() == 1.0
    with pytest.raises(EvalError, match="40 feature rows but 39 labels"):
        train_head(feats, labels[:-1], 2)


def test_tasks_and_bad_input(shared_data):
    with pytest.raises(EvalError, match="unknown task 'nope'.*multi30k_en_de.*sst2"):
        get_task("nope")
    with pytest.raises(EvalError, match="unknown task"):
        run_task("nope", None)
    texts, labels = load_sst2(str(shared_data), "dev")
    assert len(texts) == len(labels) == 872 and set(labels.tolist()) == {0, 1}
    p = sst2_prompt("fine .", [("great .", 1), ("bad .", 0)])
    assert p.endswith("Review: fine .\nSentiment:") and "Sentiment: positive\n\n" in p
    with pytest.raises(EvalError, match="not found"):
        load_sst2(str(shared_data / "nowhere"), "test")


def test_cli_unknown_task_lists_tasks():
    r = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "evaluate.py"), "--task=nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    listed = "available tasks: bigbench:<name>, multi30k_en_de, perplexity, ptb, sst2, sst2_head"
    assert "unknown task 'nope'; " + listed in r.stderr
