"""SmolLM2-135M (GGUF): perplexity equals HF transformers' on the same weights, tokens and windows;
option log-likelihood scoring equals per-sequence scoring. The model is loaded once per module."""

import math
import os

import numpy as np
import pytest

from lm_jax.convert.gguf import smollm2_gguf_path
from lm_jax.eval.classification import option_loglikelihoods
from lm_jax.eval.perplexity import perplexity, text_windows

pytestmark = pytest.mark.slow

WINDOW = 256


@pytest.fixture(scope="module")
def smol():
    from lm_jax.convert import from_gguf

    return from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def shakespeare_ids(smol, shared_data):
    _, _, tok = smol
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:3000]
    ids = tok.encode(text)
    assert len(ids) > 2 * WINDOW + 1
    return text, ids[: 2 * WINDOW + 1]  # two windows of 256 input tokens


def test_perplexity_matches_hf_transformers(smol, shakespeare_ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params, tok = smol
    _, ids = shakespeare_ids
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    # HF: the same windows; its own shifted-label loss (mean over counted labels) x count.
    hf_nll, hf_count = 0.0, 0
    for p in text_windows(ids, WINDOW):
        seq = np.concatenate([p.inputs, p.targets[-1:]]).astype(np.int64)  # + the last target
        labels = seq.copy()
        labels[1:][p.mask == 0] = -100
        labels[0] = -100
        with torch.no_grad():
            out = hf(torch.tensor(seq[None]), labels=torch.tensor(labels[None]))
        n = int(p.mask.sum())
        hf_nll += float(out.loss) * n
        hf_count += n
    ours = perplexity(cfg, params, tok, [tok.decode(ids)], window=WINDOW, batch_size=2)
    assert tok.encode(tok.decode(ids)) == list(ids)  # same tokenization
    assert ours.tokens == hf_count == 2 * WINDOW
    assert ours.perplexity == pytest.approx(math.exp(hf_nll / hf_count), rel=1e-3)


def test_option_loglikelihood_equals_sequence_scoring(smol):
    from lm_jax.sequence_scoring import continuation_logprobs

    cfg, params, tok = smol
    prompts = [
        "Review: a gorgeous, witty film.\nSentiment:",
        "Review: dull and tedious.\nSentiment:",
    ]
    options = [" negative", " positive"]
    ll, cnt = option_loglikelihoods(cfg, params, tok, prompts, options, batch_size=4)
    for i, p in enumerate(prompts):
        for k, o in enumerate(options):
            want = float(
                np.sum(continuation_logprobs(cfg, params, [tok.encode(p)], [tok.encode(o)]))
            )
            assert ll[i, k] == pytest.approx(want, rel=1e-4, abs=1e-3)
    assert (cnt == 1).all()
    assert ll[0, 1] > ll[0, 0] and ll[1, 0] > ll[1, 1]
