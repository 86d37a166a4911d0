"""Packing pipeline: batch contract, every token once per epoch, determinism, resumable state,
per-process slices, one-pass evaluation with byte counts."""

import dataclasses
import json

import numpy as np
import pytest

from lm_jax.configs.base import ConfigError
from lm_jax.data import (
    BATCH_KEYS,
    ByteTokenizer,
    DataConfig,
    DataSourceError,
    build_tokenizer_for,
    load_texts,
    make_eval_dataset,
    make_text_dataset,
)
from lm_jax.data.pipeline import token_stream

T, B = 16, 4
DTYPES = {k: np.int32 for k in BATCH_KEYS} | {"loss_mask": np.float32}


def _cfg(corpus, **kw):
    return DataConfig(**{"source": corpus, "tokenizer": "byte", "seq_len": T, "batch_size": B} | kw)


def _rows(batches):
    return [{k: b[k][i] for k in BATCH_KEYS} for b in batches for i in range(len(b["inputs"]))]


def _docs_tokens(corpus, split="train"):
    tok = ByteTokenizer()
    return {i: np.array(list(t.encode()) + [tok.eos_id]) for i, t in load_texts(corpus, split)}


def _check_row(row, docs):
    ids, pos, seg, mask = row["example_ids"], row["positions"], row["segment_ids"], row["loss_mask"]
    inp, tgt = row["inputs"], row["targets"]
    assert ((ids < 0) == (seg == 0)).all() and (mask[ids < 0] == 0).all()
    for t in range(T):
        if ids[t] < 0:
            continue
        new = t == 0 or seg[t] != seg[t - 1]
        assert pos[t] == (0 if new else pos[t - 1] + 1)
        assert new == (t == 0 or ids[t] != ids[t - 1])
        if mask[t]:  # a scored target is the next token of the same document
            if t + 1 < T and ids[t + 1] >= 0:
                assert ids[t + 1] == ids[t] and tgt[t] == inp[t + 1]
        elif t + 1 < T:  # unscored: the next input is another document or padding
            assert ids[t + 1] != ids[t]
    for s in np.unique(seg[seg > 0]):  # each piece is a contiguous slice of its document
        piece = inp[seg == s]
        doc = docs[int(ids[seg == s][0])]
        starts = np.flatnonzero(doc[: len(doc) - len(piece) + 1] == piece[0])
        assert any((doc[a : a + len(piece)] == piece).all() for a in starts)


def _epoch_counts(rows, docs):
    """Per document: bincount of its input tokens; total scored targets."""
    per = {d: np.zeros(258, int) for d in docs}
    for r in rows:
        for d in np.unique(r["example_ids"][r["example_ids"] >= 0]):
            per[int(d)] += np.bincount(r["inputs"][r["example_ids"] == d], minlength=258)
    return per, sum(float(r["loss_mask"].sum()) for r in rows)


def test_batches_pack_documents_and_cover_every_token_once_per_epoch(corpus):
    cfg = _cfg(corpus, seed=3)
    it = make_text_dataset(cfg, ByteTokenizer(), "train")
    docs = _docs_tokens(corpus)
    n_tokens = sum(len(d) for d in docs.values())
    n_rows = -(-n_tokens // T)
    assert it.stats["rows"] == n_rows and it.stats["tokens"] == n_tokens
    ends = np.cumsum([len(d) for d in docs.values()])
    starts = ends - [len(d) for d in docs.values()]
    assert it.stats["split_documents"] == sum(starts // T != (ends - 1) // T) >= 5
    batches = [next(it) for _ in range(-(-2 * n_rows // B))]
    for k in BATCH_KEYS:
        assert batches[0][k].shape == (B, T) and batches[0][k].dtype == DTYPES[k]
    rows = _rows(batches)
    for r in rows[: 2 * n_rows]:
        _check_row(r, docs)
    want = {d: np.bincount(t, minlength=258) for d, t in docs.items()}
    pairs = sum(len(d) - 1 for d in docs.values())  # next-token pairs inside documents
    for epoch in range(2):  # epoch 1 is cut at a seeded offset, read circularly
        per, scored = _epoch_counts(rows[epoch * n_rows : (epoch + 1) * n_rows], docs)
        for d in docs:
            np.testing.assert_array_equal(per[d], want[d])
        assert scored == pairs
    order = [tuple(r["example_ids"]) for r in rows]
    assert order[:n_rows] != order[n_rows : 2 * n_rows]  # a different permutation and cut


def test_same_seed_same_batches_other_seed_differs(corpus):
    tok = ByteTokenizer()
    a = [
        next(it) for it in [make_text_dataset(_cfg(corpus, seed=1), tok, "train")] for _ in range(6)
    ]
    again = make_text_dataset(_cfg(corpus, seed=1), tok, "train")
    other = make_text_dataset(_cfg(corpus, seed=2), tok, "train")
    same = [all((x[k] == y[k]).all() for k in BATCH_KEYS) for x, y in zip(a, again)]
    assert all(same)
    assert not all((x["example_ids"] == next(other)["example_ids"]).all() for x in a)


@pytest.mark.slow
def test_worker_processes_give_identical_batches_and_resume(corpus):
    tok = ByteTokenizer()
    want = make_text_dataset(_cfg(corpus), tok, "train")
    want = [next(want) for _ in range(8)]
    it = make_text_dataset(_cfg(corpus, num_workers=2), tok, "train")
    try:
        got = [next(it) for _ in range(5)]
        state = it.get_state()
    finally:
        it.close()
    resumed = make_text_dataset(_cfg(corpus, num_workers=2), tok, "train")
    resumed.set_state(state)
    try:
        got += [next(resumed) for _ in range(3)]
    finally:
        resumed.close()
    for x, y in zip(want, got):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_from_json_state_yields_the_same_next_batches(corpus):
    cfg, tok = _cfg(corpus, seed=5), ByteTokenizer()
    it = make_text_dataset(cfg, tok, "train")
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(5)]
    fresh = make_text_dataset(cfg, tok, "train")
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], w[k])
    other = make_text_dataset(dataclasses.replace(cfg, seq_len=8), tok, "train")
    with pytest.raises(ConfigError, match="seq_len"):
        other.set_state(state)


def test_processes_read_disjoint_slices_of_each_global_batch(corpus):
    cfg, tok = _cfg(corpus, batch_size=4), ByteTokenizer()
    whole = make_text_dataset(cfg, tok, "train")
    parts = [
        make_text_dataset(cfg, tok, "train", process_index=p, process_count=2) for p in range(2)
    ]
    for _ in range(5):
        g = next(whole)
        local = [next(p) for p in parts]
        assert all(x["inputs"].shape == (2, T) for x in local)
        for k in BATCH_KEYS:  # process p holds global rows p, p + 2, ...
            np.testing.assert_array_equal(g[k][0::2], local[0][k])
            np.testing.assert_array_equal(g[k][1::2], local[1][k])
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        make_text_dataset(cfg, tok, "train", process_index=0, process_count=3)


def test_eval_pass_covers_the_split_once_and_counts_bytes(corpus):
    cfg, tok = _cfg(corpus, batch_size=3), ByteTokenizer()
    docs = _docs_tokens(corpus, "validation")
    it = make_eval_dataset(cfg, tok, process_index=0, process_count=1)
    batches = list(it)
    n_rows = -(-sum(len(d) for d in docs.values()) // T)
    assert len(batches) == it.num_batches == -(-n_rows // 3)
    rows = _rows(batches)
    assert all(r["loss_mask"].sum() == 0 for r in rows[n_rows:])  # padding rows
    for r in rows:
        _check_row(r, docs)
    per, scored = _epoch_counts(rows, docs)
    for d, toks in docs.items():
        np.testing.assert_array_equal(per[d], np.bincount(toks, minlength=258))
    assert scored == sum(len(d) - 1 for d in docs.values())
    texts = dict(load_texts(corpus, "validation"))
    assert it.doc_bytes == {i: len(t.encode()) for i, t in texts.items()}
    assert it.total_bytes == sum(it.doc_bytes.values()) > len("".join(texts.values()))


def test_eval_over_two_processes_splits_rows_evenly(corpus):
    cfg, tok = _cfg(corpus, batch_size=4), ByteTokenizer()
    whole = list(make_eval_dataset(cfg, tok))
    parts = [list(make_eval_dataset(cfg, tok, process_index=p, process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for g, a, b in zip(whole, *parts):
        np.testing.assert_array_equal(g["inputs"][0::2], a["inputs"])
        np.testing.assert_array_equal(g["inputs"][1::2], b["inputs"])


def test_char_tokenizer_default_corpus_and_token_cache():
    cfg = DataConfig(seq_len=32, batch_size=2)  # embedded Shakespeare, char-level
    tok = build_tokenizer_for(cfg)
    assert 60 < tok.vocab_size < 100 and tok.eos_id is None
    it = make_text_dataset(cfg, tok, "train")
    b = next(it)
    first = b["segment_ids"][0] == 1
    text = dict(load_texts("shakespeare", "train"))[int(b["example_ids"][0, 0])]
    assert b["inputs"].shape == (2, 32) and tok.decode(b["inputs"][0][first]) in text
    assert token_stream(cfg, tok, "train") is token_stream(cfg, tok, "train")  # tokenized once
    assert it.stats["documents"] == 42


def test_config_and_corpus_errors_name_the_problem(tmp_path):
    for kw, field in [
        ({"seq_len": 0}, "data.seq_len"),
        ({"batch_size": -1}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
    ]:
        with pytest.raises(ConfigError, match=field):
            DataConfig(**kw)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataSourceError, match="blank.txt"):
        make_text_dataset(_cfg(f"file:{tmp_path}/blank.txt"), ByteTokenizer(), "train")
    with pytest.raises(DataSourceError, match="no such file"):
        make_text_dataset(_cfg(f"file:{tmp_path}/none.txt"), ByteTokenizer(), "train")


def test_single_document_wraps_around_with_a_boundary(tmp_path):
    """One document, no EOS (char tokenizer): where a later epoch's circular read joins the
    document's end to its start, a new segment starts and that target is not scored."""
    from lm_jax.data import CharTokenizer

    (tmp_path / "one.txt").write_text("abcdefghijklmnopqrstuvwxyz" * 3)
    cfg = DataConfig(source=f"file:{tmp_path}/one.txt", tokenizer="char", seq_len=T, batch_size=1)
    [(_, text)] = load_texts(cfg.source, "train")
    tok = CharTokenizer.from_texts([text])
    it = make_text_dataset(cfg, tok, "train")
    n_rows, joins = it.stats["rows"], 0
    rows = _rows([next(it) for _ in range(3 * n_rows)])
    for epoch in range(3):
        ep = rows[epoch * n_rows : (epoch + 1) * n_rows]
        assert sum(float(r["loss_mask"].sum()) for r in ep) == len(text) - 1
        assert sorted(np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in ep])) == sorted(
            tok.encode(text)
        )
        for r in ep:
            for t in range(T - 1):
                if r["segment_ids"][t + 1] > 0 and r["segment_ids"][t + 1] != r["segment_ids"][t]:
                    assert r["loss_mask"][t] == 0 and r["positions"][t + 1] == 0
                    assert tok.decode(r["inputs"][t + 1 :]).startswith("abc")
                    joins += 1
    assert joins >= 1
