"""Sequence labelling: word -> first-subword label alignment equal to transformers' word_ids
recipe on real WNUT-16 tweets; long sentences cut into rows of whole words; the Brown split by
file and its base tags; CoNLL reading; the most-frequent-tag baseline and seqeval's entity F1
on hand-computed cases; a tiny encoder learns a tagging rule through the one loop, and 8
devices give the single-device losses."""

import gzip

import jax
import numpy as np
import pytest

from lm_jax.configs.encoder import EncoderConfig, bert_style
from lm_jax.configs.tagging import TaggerConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.convert import hf_bert
from lm_jax.data import tagged_corpora as tc
from lm_jax.data.hf_tokenizer import HFTokenizer
from lm_jax.errors import ConfigError, DataSourceError
from lm_jax.eval.tagging import MostFrequentTag, entity_scores, pos_scores, token_accuracy
from lm_jax.sharding import make_mesh
from lm_jax.train import engine
from lm_jax.train.example_task import epoch_batches
from lm_jax.train.tagging import IGNORE, TaggingTask, encode_sentences


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return HFTokenizer.from_pretrained_dir(hf_bert.packaged_minilm_dir())


@pytest.fixture(scope="module")
def wnut(shared_data):
    return tc.read_conll(str(shared_data / "wnut16" / "train.tsv.gz"))


def test_first_subword_labels_equal_transformers_word_ids(minilm_tokenizer, wnut):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_bert.packaged_minilm_dir())
    sents = wnut[:200]
    tags = tc.tag_set(sents)
    labels = [[tags.index(t) for t in ts] for _, ts in sents]
    rows = encode_sentences(minilm_tokenizer, [w for w, _ in sents], labels, max_tokens=512)
    assert len(rows) == len(sents)
    compared = 0
    for (words, _), lab, row in zip(sents, labels, rows):
        enc = hf(words, is_split_into_words=True)
        word_ids = enc.word_ids()
        if len(set(w for w in word_ids if w is not None)) < len(words):
            continue  # a word transformers drops entirely; checked below
        ref = [IGNORE] * len(word_ids)
        previous = None
        for i, w in enumerate(word_ids):  # the token-classification recipe: first subword
            if w is not None and w != previous:
                ref[i] = lab[w]
            previous = w
        assert row.ids.tolist() == enc["input_ids"]
        assert row.labels.tolist() == ref
        compared += 1
    assert compared >= 190


def test_a_word_with_no_subwords_becomes_unk(minilm_tokenizer):
    rows = encode_sentences(minilm_tokenizer, [["hello", "\u200b", "world"]], [[1, 2, 3]], 64)
    unk = minilm_tokenizer.token_to_id("[UNK]")
    (row,) = rows
    assert row.ids[row.word_pos].tolist()[1] == unk
    assert row.labels[row.word_pos].tolist() == [1, 2, 3]


def test_long_sentences_become_rows_of_whole_words(minilm_tokenizer, wnut):
    words = [w for s, _ in wnut[:40] for w in s if len(w) < 15]  # one long "sentence"
    labels = [list(range(len(words)))]
    rows = encode_sentences(minilm_tokenizer, [words], labels, max_tokens=24)
    full = encode_sentences(minilm_tokenizer, [words], labels, max_tokens=100_000)[0]
    assert len(rows) > 10 and all(len(r.ids) <= 24 for r in rows)
    assert [r.first_word for r in rows] == np.cumsum(
        [0] + [len(r.word_pos) for r in rows[:-1]]
    ).tolist()
    got = [lab for r in rows for lab in r.labels[r.word_pos]]
    assert got == labels[0]  # every word once, in order
    inner = [i for r in rows for i in r.ids[1:-1]]
    assert inner == full.ids[1:-1].tolist()  # the same subwords, only cut between words


def test_epoch_batches_cover_every_row_once_and_depend_on_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(3, 60, 203)
    a = epoch_batches(lengths, 8, 5, seed=0, epoch=0)
    assert sorted(np.concatenate(a).tolist()) == list(range(203))
    assert len(a) == len(epoch_batches(lengths, 8, 5, seed=0, epoch=3))
    assert [b.tolist() for b in a] == [b.tolist() for b in epoch_batches(lengths, 8, 5, 0, 0)]
    assert [b.tolist() for b in a] != [b.tolist() for b in epoch_batches(lengths, 8, 5, 0, 1)]
    spread = np.mean([np.ptp(lengths[b]) for b in a])
    assert spread < 0.5 * np.mean([np.ptp(lengths[b]) for b in epoch_batches(lengths, 8, 1, 0, 0)])


def test_base_tags_and_the_brown_split(shared_data):
    assert tc.base_tag("nn-tl") == "nn" and tc.base_tag("vbd-hl") == "vbd"
    assert tc.base_tag("nn-tl-hl") == "nn" and tc.base_tag("np$-nc") == "np$"
    assert tc.base_tag("fw-nn") == "fw-nn" and tc.base_tag("--") == "--"
    assert tc.base_tag("ppss+bem") == "ppss+bem"
    assert [tc.brown_part(f) for f in ("ca05", "cr05", "ca10", "cp20", "ca01", "ca44")] == [
        "test", "test", "dev", "dev", "train", "train"]  # fmt: skip
    files = tc.read_brown(str(shared_data / "brown" / "brown.tar.gz"))
    assert len(files) == 500
    parts = tc.brown_split(files)
    assert {k: len(v) for k, v in parts.items()} == {"train": 46682, "dev": 4744, "test": 5914}
    assert sum(len(w) for w, _ in parts["test"]) == 120857
    words, tags = files["ca01"][0]
    assert words[:3] == ["The", "Fulton", "County"] and tags[:3] == ["at", "np-tl", "nn-tl"]
    genres = {f[1] for f in files if tc.brown_part(f) == "test"}
    assert genres == {f[1] for f in files}  # every genre is in the test files


def test_conll_reading_and_its_errors(tmp_path, wnut):
    assert len(wnut) == 2394 and sum(len(w) for w, _ in wnut) == 46469
    assert wnut[0][0][:2] == ["@paulwalk", "It"]
    p = tmp_path / "x.tsv.gz"
    with gzip.open(p, "wt") as f:
        f.write("a\tO\nb\tB-x\n\t\n\nc\tI-x\n")
    assert tc.read_conll(str(p)) == [(["a", "b"], ["O", "B-x"]), (["c"], ["I-x"])]
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tO\nlonely\n")
    with pytest.raises(DataSourceError, match=r"bad.tsv:2: expected token<TAB>tag"):
        tc.read_conll(str(bad))
    with pytest.raises(DataSourceError, match="not found"):
        tc.read_conll(str(tmp_path / "missing.tsv"))
    kept, out = tc.held_out_split(wnut, 0.2, seed=0)
    assert len(out) == round(0.2 * len(wnut)) and len(kept) + len(out) == len(wnut)
    assert kept == tc.held_out_split(wnut, 0.2, seed=0)[0] != tc.held_out_split(wnut, 0.2, 1)[0]


def test_most_frequent_tag_baseline_by_hand():
    words = [["the", "dog", "runs"], ["The", "runs", "runs"], ["a", "dog"]]
    tags = [["at", "nn", "vbz"], ["at", "nns", "vbz"], ["at", "nn"]]
    mft = MostFrequentTag(words, tags)
    assert mft.predict([["runs", "dog", "THE", "cat"]]) == [["vbz", "nn", "at", "at"]]
    # "runs": vbz 2, nns 1; "THE" via lowercase; "cat" unseen -> "at" (4 of 8 tags)
    gold = [["vbz", "nn", "at", "nn-tl"]]
    assert token_accuracy(gold, mft.predict([["runs", "dog", "THE", "cat"]])) == 0.75
    got = pos_scores(gold, [["vbz", "nn", "at", "nn"]], tc.base_tag)
    assert got["accuracy"] == 0.75 and got["base_accuracy"] == 1.0


def test_entity_scores_follow_conlleval_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "I-ORG", "I-ORG"]]
    s = entity_scores(gold, pred)
    # gold PER, LOC, ORG; predicted PER (right), ORG (wrong span: at pos 3), ORG (an I- start
    # opens an entity, conlleval's rule: right)  -> P = 2/3, R = 2/3
    assert s["entity_precision"] == pytest.approx(2 / 3) and s["entity_recall"] == pytest.approx(
        2 / 3
    )
    assert s["entity_f1"] == pytest.approx(2 / 3) and s["entities_gold"] == 3
    assert s["f1_LOC"] == 0.0 and s["f1_PER"] == 1.0 and s["f1_ORG"] == pytest.approx(2 / 3)


def _toy(n: int, seed: int):
    """Words from a small vocabulary; the tag is the word's length class (learnable)."""
    rng = np.random.default_rng(seed)
    vocab = "the dog cat runs quickly house green beautiful walked a an it is was over".split()
    sents = []
    for _ in range(n):
        ws = [vocab[i] for i in rng.integers(0, len(vocab), rng.integers(3, 12))]
        sents.append((ws, ["S" if len(w) <= 3 else "M" if len(w) <= 5 else "L" for w in ws]))
    return sents


def _task(minilm_tokenizer, mesh, steps=60, pretrained=None):
    model = bert_style(vocab_size=minilm_tokenizer.vocab_size, d_model=32, num_layers=2,
                       num_heads=2, mlp_dim=64, max_len=64)  # fmt: skip
    cfg = EncoderConfig(model, head="token", pooler=False, num_labels=3)
    labels = ["L", "M", "S"]
    train = [(w, [labels.index(t) for t in ts]) for w, ts in _toy(160, 0)]
    dev = _toy(40, 1)
    evals = {"dev": ([w for w, _ in dev], [t for _, t in dev])}
    tcfg = TrainConfig(steps=steps, learning_rate=3e-3, warmup_steps=5, weight_decay=0.0,
                       workdir="/unused", log_every=1000, eval_every=0,
                       progress_bar=False)  # fmt: skip
    tagger = TaggerConfig(batch_size=16, max_tokens=32, pool_batches=2)
    return TaggingTask(cfg, tagger, tcfg, minilm_tokenizer, train, evals, labels,
                       lambda g, p: pos_scores(g, p), mesh, pretrained)  # fmt: skip


def test_a_tiny_encoder_learns_a_tagging_rule_on_the_one_loop(minilm_tokenizer):
    task = _task(minilm_tokenizer, make_mesh("data:1", jax.devices()[:1]))
    res = engine.run(task, task.train_cfg, log=lambda *_: None, save=False)
    assert res.eval["dev_accuracy"] > 0.95
    gold, pred = task.predict_tags(res.state, "dev")
    assert [len(p) for p in pred] == [len(g) for g in gold]
    assert token_accuracy(gold, pred) == res.eval["dev_accuracy"]


def test_eight_devices_give_the_single_device_steps(minilm_tokenizer):
    def losses(mesh):
        task = _task(minilm_tokenizer, mesh, steps=4)
        state, out = task.init_state(), []
        for s in range(4):
            state, m = task.train_step(state, s)
            out.append(float(m["loss"]))
        return out, jax.device_get(state.params)

    one, p1 = losses(make_mesh("data:1", jax.devices()[:1]))
    eight, p8 = losses(make_mesh("data:8"))
    np.testing.assert_allclose(one, eight, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # Adam: tiny grads, sign-like steps


def test_bad_config_values_are_one_line_errors(minilm_tokenizer):
    with pytest.raises(ConfigError, match="tagger.max_tokens must be >= 4"):
        TaggerConfig(max_tokens=2)
    with pytest.raises(ConfigError, match="leaves no room"):
        encode_sentences(minilm_tokenizer, [["a"]], None, max_tokens=2)


def test_a_tokenizer_without_an_unknown_token_is_refused():
    from types import SimpleNamespace

    from lm_jax.train.tagging import unk_id_of

    with pytest.raises(ConfigError, match=r"no unknown-word token"):
        unk_id_of(SimpleNamespace(tk=SimpleNamespace(token_to_id=lambda name: None, encode=None)))
