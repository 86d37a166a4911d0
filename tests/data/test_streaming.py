"""Streaming sources and mixtures: shares, exact resume (JSON state), disjoint process slices that
cover an epoch, lazy tfds/array_record reading, clear errors, and RSS that does not grow with
the corpus."""

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lm_jax.configs.base import ConfigError
from lm_jax.data import BATCH_KEYS, ByteTokenizer, DataConfig, load_texts, make_text_dataset
from lm_jax.data.sources import paragraphs
from lm_jax.data.streaming import (
    DocStream,
    StreamIterator,
    iter_documents,
    make_stream_dataset,
    open_source,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_paragraphs(path, n, prefix, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "and", "of", "to", "a", "é", "Ω"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(3)]
            f.write(f"{prefix}{i} " + "\n".join(lines[: rng.integers(1, 4)]) + "\n\n")
    return str(path)


def _cfg(source, **kw):
    base = {"source": source, "tokenizer": "byte", "seq_len": 16, "batch_size": 8}
    return DataConfig(**(base | {"block_bytes": 1024} | kw))


def _same(a, b):
    return all((x[k] == y[k]).all() for x, y in zip(a, b, strict=True) for k in BATCH_KEYS)


@pytest.fixture
def two_files(tmp_path):
    a = _write_paragraphs(tmp_path / "a.txt", 400, "A", seed=1)
    # b: digits only, so a row's source shows in its tokens
    with open(tmp_path / "b.txt", "w") as f:
        for i in range(300):
            f.write(" ".join(str(i * 7 + j) for j in range(1 + i % 9)) + "\n")
    return a, str(tmp_path / "b.txt")


def test_mixture_shares_match_weights_over_10k_rows(two_files):
    a, b = two_files
    cfg = _cfg(f"mix:0.7*stream:{a},0.3*stream_lines:{b}", batch_size=100)
    it = make_text_dataset(cfg, ByteTokenizer(), "train")
    assert isinstance(it, StreamIterator) and it.stats["weights"] == [0.7, 0.3]
    letters = set(b"abcdefghijklmnopqrstuvwxyzA")
    from_a = n = 0
    for _ in range(100):
        batch = next(it)
        for row, ids in zip(batch["inputs"], batch["example_ids"], strict=True):
            toks = set(row[ids >= 0].tolist())
            from_a += bool(toks & letters)
            n += 1
    assert n == 10_000 and abs(from_a / n - 0.7) < 0.01
    # rows of one batch come in a seeded order, not all of one source first
    first = next(it)["inputs"]
    kinds = [bool(set(r.tolist()) & letters) for r in first]
    assert kinds != sorted(kinds, reverse=True)


def test_mixture_resume_is_exact_after_json_round_trip(two_files):
    a, b = two_files
    cfg = _cfg(f"mix:2*stream:{a},1*stream_lines:{b}", batch_size=6, seq_len=32, seed=3)
    tok = ByteTokenizer()
    ref = make_text_dataset(cfg, tok, "train")
    for _ in range(150):  # past the end of an epoch of b's train part
        next(ref)
    state = json.loads(json.dumps(ref.get_state()))
    expect = [next(ref) for _ in range(200)]
    again = make_text_dataset(cfg, tok, "train")
    again.set_state(state)
    assert _same([next(again) for _ in range(200)], expect)
    # no prefetch thread: the same batches and, after each, the same state
    plain = make_stream_dataset(cfg, tok, "train", prefetch=0)
    plain.set_state(state)
    again.set_state(state)
    for _ in range(20):
        assert _same([next(plain)], [next(again)]) and plain.get_state() == again.get_state()
    other = make_text_dataset(_cfg(cfg.source, batch_size=6, seq_len=32, seed=4), tok, "train")
    with pytest.raises(ConfigError, match="different data set-up"):
        other.set_state(state)


def test_stream_file_slices_cover_each_epoch_once_and_resume_exactly(tmp_path):
    path = _write_paragraphs(tmp_path / "c.txt", 600, "doc")
    text = open(path, encoding="utf-8").read()
    src = open_source(f"stream:{path}", "train", block_bytes=1024)
    val = open_source(f"stream:{path}", "validation", block_bytes=1024)
    assert src.num_units() > 20
    # train head + validation tail = every paragraph of the file, in order, none cut
    stored = [t for u in range(src.num_units()) for _, t in src.read_unit(u)]
    held = [t for u in range(val.num_units()) for _, t in val.read_unit(u)]
    assert stored + held == paragraphs(text) and 0.03 < len(held) / len(stored) < 0.08
    # three processes: disjoint slices whose union is the epoch, epochs differ in order
    P, seen, order = 3, [], []
    for p in range(P):
        ds = DocStream(src, seed=5, process_index=p, process_count=P)
        mine = []
        while True:
            pos, _, t = ds.next()
            if pos[0] == 1:
                break
            mine.append(t)
        seen += mine
        order.append(mine)
    assert collections.Counter(seen) == collections.Counter(stored)
    assert order[0] != stored[: len(order[0])]
    # the batch iterator of one process resumes exactly from a mid-document position
    cfg = _cfg(f"stream:{path}", batch_size=6)
    tok = ByteTokenizer()
    ref = make_text_dataset(cfg, tok, "train", process_index=1, process_count=3)
    for _ in range(37):
        next(ref)
    state = ref.get_state()
    assert state["sources"][0]["offset"] > 0
    expect = [next(ref) for _ in range(300)]  # crosses into epoch 2
    assert ref.get_state()["sources"][0]["doc"][0] >= 1
    again = make_text_dataset(cfg, tok, "train", process_index=1, process_count=3)
    again.set_state(json.loads(json.dumps(state)))
    assert _same([next(again) for _ in range(300)], expect)


def test_stream_rows_follow_the_packing_contract_and_eval_covers_the_split(tmp_path):
    path = _write_paragraphs(tmp_path / "d.txt", 300, "p")
    tok = ByteTokenizer()
    cfg = _cfg(f"stream:{path}", batch_size=4)
    docs = [t for _, t in iter_documents(cfg, "validation")]
    stream = np.concatenate([np.r_[list(t.encode()), tok.eos_id] for t in docs])
    one = list(make_text_dataset(cfg, tok, "validation"))
    rows = [{k: b[k][i] for k in BATCH_KEYS} for b in one for i in range(4)]
    got = np.concatenate([r["inputs"][r["example_ids"] >= 0] for r in rows])
    assert (got == stream).all()  # every token an input once, in order
    assert sum(r["loss_mask"].sum() for r in rows) == stream.size - len(docs)
    for r in rows:
        seg, pos, m = r["segment_ids"], r["positions"], r["loss_mask"]
        new = np.r_[True, seg[1:] != seg[:-1]] & (seg > 0)  # a document piece starts
        assert (pos[new] == 0).all() and (pos[(seg > 0) & ~new] > 0).all()
        assert (m[:-1][seg[1:] != seg[:-1]] == 0).all()
        t = np.flatnonzero(m[:-1])
        assert (r["targets"][t] == r["inputs"][t + 1]).all()
    assert make_text_dataset(cfg, tok, "validation").total_bytes == sum(
        len(t.encode()) for t in docs
    )
    # two processes: same number of batches, rows interleave into the one-process pass
    parts = [
        list(make_text_dataset(cfg, tok, "validation", process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(one)
    for k, b in enumerate(one):
        for p in range(2):
            assert (parts[p][k]["inputs"] == b["inputs"][p::2]).all()


def test_tfds_and_array_record_sources_stream(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    from lm_jax.data.tfds_text import build_text_dataset

    f = _write_paragraphs(tmp_path / "t.txt", 80, "t")
    path = build_text_dataset([f], str(tmp_path / "tfds"), "lm_jax_stream_test", docs="paragraph")
    cfg = _cfg(f"tfds_dir:{path}")
    for split in ("train", "validation"):
        got = sorted(iter_documents(cfg, split))
        assert got == sorted(load_texts(f"tfds_dir:{path}", split))
    it = make_text_dataset(cfg, ByteTokenizer(), "train")
    assert isinstance(it, StreamIterator) and it.stats["units"] == len(
        load_texts(cfg.source, "train")
    )
    next(it)
    rec = str(tmp_path / "docs.array_record")
    w = ArrayRecordWriter(rec, "group_size:1")
    texts = [f"record {i} é" for i in range(40)]
    for t in texts:
        w.write(t.encode())
    w.close()
    acfg = _cfg(f"array_record:{rec}")
    assert [t for _, t in iter_documents(acfg, "train")] == texts[:38]
    assert [t for _, t in iter_documents(acfg, "validation")] == texts[38:]
    assert next(make_text_dataset(acfg, ByteTokenizer(), "train"))["inputs"].shape == (8, 16)


def test_bad_streaming_sources_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="mixture weight '-1'.*positive"):
        DataConfig(source="mix:0.5*shakespeare,-1*shakespeare")
    with pytest.raises(ConfigError, match="mixture weight '0'.*positive"):
        DataConfig(source="mix:0*shakespeare")
    with pytest.raises(ConfigError, match="no '<weight>\\*'.*mix:<w>\\*<source>"):
        DataConfig(source="mix:shakespeare")
    with pytest.raises(ConfigError, match="not a number"):
        DataConfig(source="mix:x*shakespeare")
    with pytest.raises(ConfigError, match="unknown data source 'ftp:x'"):
        DataConfig(source="mix:1*ftp:x")
    with pytest.raises(ConfigError, match="do not nest"):
        DataConfig(source="mix:1*mix:1*shakespeare")
    with pytest.raises(ConfigError, match="block_bytes"):
        DataConfig(block_bytes=0)
    cfg = _cfg(f"mix:1*stream:{tmp_path}/missing.txt,1*shakespeare")
    with pytest.raises(ConfigError, match="no such file.*missing.txt"):
        make_text_dataset(cfg, ByteTokenizer(), "train")
    (tmp_path / "one.txt").write_text("just one block\n")
    with pytest.raises(ConfigError, match="fewer than the 2 processes"):
        make_text_dataset(
            _cfg(f"stream:{tmp_path}/one.txt"), ByteTokenizer(), "train", process_count=2
        )
    docs = load_texts(f"stream:{tmp_path}/one.txt", "train", val_fraction=0.5)  # read whole
    assert [t for _, t in docs] == ["just one block"]
    with pytest.raises(ConfigError, match="is a mixture"):
        load_texts(f"mix:1*stream:{tmp_path}/one.txt", "train")


RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    from lm_jax.data import ByteTokenizer, DataConfig, make_text_dataset

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    cfg = DataConfig(source="stream:" + sys.argv[1], tokenizer="byte", seq_len=4096,
                     batch_size=16)
    it = make_text_dataset(cfg, ByteTokenizer(), "train")
    next(it)
    before, n = hwm(), 0
    for _ in range(int(sys.argv[2])):
        n += int(next(it)["loss_mask"].sum())
    print(before, hwm(), n)
    """
)


def test_streaming_peak_rss_does_not_grow_with_the_corpus(tmp_path):
    path = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    words = np.array(["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "é"])
    paras = ["\n".join(" ".join(rng.choice(words, 12)) for _ in range(100)) for _ in range(64)]
    chunk = ("\n\n".join(paras) + "\n\n").encode()
    with open(path, "wb") as f:  # ~250 MB in 1 MB chunks
        while f.tell() < 250e6:
            f.write(chunk)
    size = os.path.getsize(path)
    batches = 2500  # 160 MB of text: most of the train split
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), str(batches)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env=os.environ | {"PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
    ).stdout.split()
    before, after, scored = (int(x) for x in out)
    assert scored > 0.6 * size  # the run read most of the corpus
    assert after - before < 64e6, (before, after, size)
