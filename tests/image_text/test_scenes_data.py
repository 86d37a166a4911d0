"""Composed scenes: held-out pairs/phrasings, captions from layouts, tfds + grain round trip."""

import numpy as np
import pytest

from lm_jax.data import scenes
from lm_jax.data.images import DIGIT_CLASSES, load_images, to_float
from lm_jax.data.tokenizer import load_tokenizer


def test_layouts_hold_out_pairs_and_phrasing():
    comp = scenes.SceneComposer(load_images("digits", "train"))
    rng = np.random.default_rng(0)
    pairs = scenes.heldout_pairs(10)
    assert len(pairs) == 9
    for _ in range(300):
        ex = comp.example(rng, heldout=False)
        n = int(ex["num_items"])
        assert 1 <= n <= 3 and ex["phrasing"] != scenes.HELDOUT_PHRASING
        assert not scenes.has_heldout_pair(ex["labels"][:n], pairs)
        assert len(set(ex["cells"][:n].tolist())) == n
        assert ex["image"].shape == (48, 48, 1) and ex["image"].dtype == np.uint8
    for _ in range(100):
        ex = comp.example(rng, heldout=True)
        n = int(ex["num_items"])
        assert ex["phrasing"] == scenes.HELDOUT_PHRASING
        assert n == 1 or scenes.has_heldout_pair(ex["labels"][:n], pairs)


def test_caption_from_layout():
    cap = scenes.caption([3, 7], [8, 0], [0, 1], DIGIT_CLASSES, 0)
    assert cap == "a large seven in the top left and a small three in the bottom right"
    assert scenes.caption([1], [4], [1], DIGIT_CLASSES, 1) == "center : large one"
    tok = scenes.WordTokenizer.for_classes(DIGIT_CLASSES)
    for p in range(len(scenes.PHRASINGS)):  # every phrasing and prompt is in the vocabulary
        text = scenes.caption([0, 5, 9], [1, 4, 6], [0, 1, 0], DIGIT_CLASSES, p)
        assert tok.unk_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode(scenes.PROMPT_TEMPLATES[2].format(cls="eight"))


def test_tfds_builder_grain_round_trip(tmp_path):
    b = scenes.build_scenes(str(tmp_path), "digits", num_train=40, num_test=12)
    assert b.info.splits["train"].num_examples == 40
    tok = scenes.WordTokenizer.for_classes(scenes.class_names_of(b))
    tok.save(str(tmp_path / "tok"))
    assert load_tokenizer(str(tmp_path / "tok")).words == tok.words
    batch = next(iter(scenes.scene_batches(b, "train", 8, tok, 40, bos=True)))
    assert batch["image"].shape == (8, 48, 48, 1) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (8, 40) and (batch["tokens"][:, 0] == tok.bos_id).all()
    lengths = batch["mask"].sum(1)
    assert (batch["tokens"][np.arange(8), lengths - 1] == tok.eos_id).all()
    row = b.as_data_source("test")[0]
    assert (
        row["caption"].decode()
        == scenes.layout_captions(row, DIGIT_CLASSES, (scenes.HELDOUT_PHRASING,))[0]
    )
    x = to_float(batch["image"])
    assert x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0


def test_rephrase_recaptions_each_read_in_training_phrasings_only(tmp_path):
    b = scenes.build_scenes(str(tmp_path), "digits", num_train=16, num_test=4)
    tok = scenes.WordTokenizer.for_classes(scenes.class_names_of(b))
    it = iter(scenes.scene_batches(b, "train", 16, tok, 40, shuffle=False, rephrase=True))
    first, second = next(it), next(it)  # two epochs of the same 16 scenes, in order
    assert (first["image"] == second["image"]).all()
    assert (first["tokens"] != second["tokens"]).any()  # new phrasings in the 2nd epoch
    rows = [b.as_data_source("train")[i] for i in range(16)]
    for batch in (first, second):
        for row, toks, mask in zip(rows, batch["tokens"], batch["mask"]):
            text = tok.decode(toks[: mask.sum() - 1])  # drop EOS
            assert text in scenes.layout_captions(row, DIGIT_CLASSES)  # a training phrasing
    again = next(iter(scenes.scene_batches(b, "train", 16, tok, 40, shuffle=False, rephrase=True)))
    assert (again["tokens"] == first["tokens"]).all()  # seeded: reproducible
    with pytest.raises(scenes.SceneError, match="training augmentation"):
        scenes.scene_batches(b, "test", 4, tok, 40, rephrase=True)
    only = scenes.scene_batches(
        b, "train", 16, tok, 40, shuffle=False, rephrase=True, class_only_fraction=1.0
    )
    batch = next(iter(only))
    for row, toks, mask in zip(rows, batch["tokens"], batch["mask"]):
        (want,) = scenes.layout_captions(row, DIGIT_CLASSES, (scenes.CLASS_ONLY_PHRASING,))
        assert tok.decode(toks[: mask.sum() - 1]) == want
    with pytest.raises(scenes.SceneError, match="class_only_fraction"):
        scenes.scene_batches(b, "train", 4, tok, 40, class_only_fraction=0.5)


def test_digits_read_without_sklearn_equal_load_digits():
    from sklearn.datasets import load_digits

    from lm_jax.data.images import _sklearn_digits

    raw, labels = _sklearn_digits()
    ref = load_digits()
    np.testing.assert_array_equal(raw, ref.images)
    np.testing.assert_array_equal(labels, ref.target)
    train, test = load_images("digits", "train"), load_images("digits", "test")
    assert len(train.labels) + len(test.labels) == 1797 and train.images.dtype == np.uint8
