"""Composed image-text scenes: 1-3 real items on a canvas, captioned from the layout.

A scene places items (real images of `lm_jax.data.images`) in distinct cells of a 3x3 grid
on a `canvas` x `canvas` grayscale canvas, each `small` or `large`; the caption names every
item's size, class and position in reading order, in one of several phrasings.

Held out for evaluation: phrasing `HELDOUT_PHRASING` (never in training captions) and a fixed
set of class pairs `heldout_pairs()` (no training scene holds both classes of a pair; every
multi-item test scene holds at least one). Test scenes use the source's test images.

Storage: the tfds builder `SceneBuilder` (array_record, uint8 `Tensor` image features: no
TensorFlow needed), read back with grain (`scene_batches`). Captions are words from a closed
vocabulary (`WordTokenizer`). The last training phrasing names the classes only ("a photo of
a shirt and a bag"): with layout words in every caption, in-batch negatives are separable by
layout alone and the towers learn classes slowly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from lm_jax.data.images import (
    DIGIT_CLASSES,
    FASHION_CLASSES,
    LabeledImages,
    load_images,
    resize,
    resolve_source,
)
from lm_jax.data.tokenizer import Tokenizer, TokenizerError, register
from lm_jax.errors import UserError

POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip  # cell = 3 * row + col
SIZES = ("small", "large")
MAX_ITEMS = 3

# One phrase per item, a joiner between items; the first item may use its own phrase.
PHRASINGS = (
    ("a {size} {cls} in the {pos}", "a {size} {cls} in the {pos}", " and "),
    ("{pos} : {size} {cls}", "{pos} : {size} {cls}", " ; "),
    ("there is a {size} {cls} in the {pos}", "a {size} {cls} in the {pos}", " , "),
    ("a photo of a {size} {cls} at the {pos}", "a {size} {cls} at the {pos}", " with "),
    ("the {pos} shows a {size} {cls}", "the {pos} shows a {size} {cls}", " and "),
    ("a photo of a {cls}", "a {cls}", " and "),  # classes only: no layout to match on
)
HELDOUT_PHRASING = 4
CLASS_ONLY_PHRASING = len(PHRASINGS) - 1
TRAIN_PHRASINGS = tuple(i for i in range(len(PHRASINGS)) if i != HELDOUT_PHRASING)
PROMPT_TEMPLATES = ("a photo of a {cls}", "a {cls}", "an image of a {cls}", "a picture of a {cls}")


class SceneError(UserError, ValueError):
    """Bad scene settings or captions that do not fit."""


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    canvas: int = 48  # H = W of the scene
    small: int = 14  # item side in pixels
    large: int = 22
    single_fraction: float = 0.34  # share of one-item scenes (the rest: 2 or 3 items)

    def __post_init__(self):
        if not 0 < self.small <= self.large <= self.canvas:
            raise SceneError(f"need 0 < small <= large <= canvas, got {self}.")

    def side(self, size: int) -> int:
        return (self.small, self.large)[size]


def heldout_pairs(num_classes: int = 10, fraction: float = 0.2, seed: int = 1234):
    """Fixed unordered class pairs (a < b) held out of training scenes."""
    pairs = [(a, b) for a in range(num_classes) for b in range(a + 1, num_classes)]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pairs), size=max(1, round(fraction * len(pairs))), replace=False)
    return frozenset(pairs[i] for i in sorted(pick))


def has_heldout_pair(classes, pairs) -> bool:
    cs = sorted(set(int(c) for c in classes))
    return any((a, b) in pairs for i, a in enumerate(cs) for b in cs[i + 1 :])


def caption(classes, cells, sizes, class_names, phrasing: int) -> str:
    """The caption of a layout (items sorted by cell, reading order) in one phrasing."""
    first, rest, joiner = PHRASINGS[phrasing]
    order = np.argsort(np.asarray(cells), kind="stable")
    parts = []
    for j, i in enumerate(order):
        fmt = first if j == 0 else rest
        parts.append(
            fmt.format(size=SIZES[sizes[i]], cls=class_names[classes[i]], pos=POSITIONS[cells[i]])
        )
    if joiner == " and " and len(parts) > 2:
        return " , ".join(parts[:-1]) + " and " + parts[-1]
    return joiner.join(parts)


def place(canvas: np.ndarray, item: np.ndarray, cell: int) -> None:
    """Max-composite item [s, s] centred on a grid cell, clamped inside the canvas (in place)."""
    C, s = canvas.shape[0], item.shape[0]
    r, c = divmod(cell, 3)
    cy, cx = (2 * r + 1) * C // 6, (2 * c + 1) * C // 6
    y = min(max(cy - s // 2, 0), C - s)
    x = min(max(cx - s // 2, 0), C - s)
    np.maximum(canvas[y : y + s, x : x + s], item, out=canvas[y : y + s, x : x + s])


class SceneComposer:
    """Draws scenes from one split of labelled images (resized once per item size)."""

    def __init__(self, images: LabeledImages, spec: SceneSpec = SceneSpec()):
        self.spec = spec
        self.class_names = images.class_names
        self.labels = images.labels
        self.by_size = [resize(images.images, spec.side(s)) for s in range(len(SIZES))]
        self.by_class = [np.flatnonzero(images.labels == c) for c in range(len(self.class_names))]
        self.pairs = heldout_pairs(len(self.class_names))

    def render(self, classes, cells, sizes, rng) -> np.ndarray:
        canvas = np.zeros((self.spec.canvas, self.spec.canvas), np.uint8)
        for c, cell, s in zip(classes, cells, sizes):
            idx = rng.choice(self.by_class[c])
            place(canvas, self.by_size[s][idx], cell)
        return canvas

    def single(self, index: int, size: int = 1, cell: int = 4) -> np.ndarray:
        """One given image alone (default: large, centre) - the zero-shot test input."""
        canvas = np.zeros((self.spec.canvas, self.spec.canvas), np.uint8)
        place(canvas, self.by_size[size][index], cell)
        return canvas

    def layout(self, rng, heldout: bool):
        """(classes, cells, sizes): training layouts avoid held-out pairs; held-out layouts with
        2-3 items contain one."""
        K = len(self.class_names)
        n = 1 if rng.random() < self.spec.single_fraction else int(rng.integers(2, MAX_ITEMS + 1))
        while True:
            if heldout and n > 1:
                pair = sorted(self.pairs)[rng.integers(len(self.pairs))]
                classes = list(pair) + list(rng.integers(0, K, size=n - 2))
                rng.shuffle(classes)
            else:
                classes = list(rng.integers(0, K, size=n))
                if n > 1 and has_heldout_pair(classes, self.pairs):
                    continue
            break
        cells = list(rng.choice(9, size=n, replace=False))
        sizes = list(rng.integers(0, len(SIZES), size=n))
        return [int(c) for c in classes], [int(c) for c in cells], [int(s) for s in sizes]

    def example(self, rng, heldout: bool) -> dict:
        classes, cells, sizes = self.layout(rng, heldout)
        phr = HELDOUT_PHRASING if heldout else int(rng.choice(TRAIN_PHRASINGS))
        pad = MAX_ITEMS - len(classes)
        return {
            "image": self.render(classes, cells, sizes, rng)[..., None],
            "caption": caption(classes, cells, sizes, self.class_names, phr),
            "labels": np.array(classes + [-1] * pad, np.int64),
            "cells": np.array(cells + [-1] * pad, np.int64),
            "sizes": np.array(sizes + [-1] * pad, np.int64),
            "num_items": np.int64(len(classes)),
            "phrasing": np.int64(phr),
        }


def layout_captions(row: dict, class_names, phrasings=TRAIN_PHRASINGS) -> list[str]:
    """All captions of a stored scene's layout in the given phrasings (references)."""
    n = int(row["num_items"])
    cls, cells, sizes = (np.asarray(row[k])[:n].tolist() for k in ("labels", "cells", "sizes"))
    return [caption(cls, cells, sizes, class_names, p) for p in phrasings]


# --------------------------------------------------------------------------- word tokenizer

_WORD = re.compile(r"[a-z0-9][a-z0-9\-]*|[^\sa-z0-9]")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def split_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@register("word")
class WordTokenizer(Tokenizer):
    """Closed word vocabulary: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then sorted words."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words):
        self.words = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self._index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def for_classes(cls, class_names) -> WordTokenizer:
        """Every word a caption or zero-shot prompt over these classes can contain."""
        texts = [p[0] + p[1] + p[2] for p in PHRASINGS] + list(POSITIONS) + list(SIZES)
        texts += list(class_names) + list(PROMPT_TEMPLATES) + [", and"]
        words = {w for t in texts for w in split_words(t.replace("{", " ").replace("}", " "))}
        return cls(words - {"size", "cls", "pos"})

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(w, self.unk_id) for w in split_words(text)]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(SPECIALS) and i < len(self.words):
                out.append(self.words[i])
        return " ".join(out)

    def _save_files(self, directory: str) -> dict:
        with open(os.path.join(directory, "words.json"), "w") as f:
            json.dump(self.words[len(SPECIALS) :], f)
        return {}

    @classmethod
    def from_dir(cls, directory: str, manifest: dict) -> WordTokenizer:
        try:
            with open(os.path.join(directory, "words.json")) as f:
                return cls(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(
                f"word tokenizer files in {directory!r} are unreadable: {e}"
            ) from e


def encode_texts(tok: WordTokenizer, texts, max_len: int, bos: bool = False, eos: bool = True):
    """Texts -> (tokens [B, max_len] int32 right-padded with pad_id, mask [B, max_len] bool).

    Raises `SceneError` when a text (with BOS/EOS) is longer than max_len (the text context).
    """
    rows = [
        ([tok.bos_id] if bos else []) + tok.encode(t) + ([tok.eos_id] if eos else []) for t in texts
    ]
    longest = max((len(r) for r in rows), default=0)
    if longest > max_len:
        i = int(np.argmax([len(r) for r in rows]))
        raise SceneError(
            f"caption {texts[i]!r} has {longest} tokens (with BOS/EOS) but the text context "
            f"is {max_len}: raise the model's max_len (text context) or shorten the captions."
        )
    tokens = np.full((len(rows), max_len), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    mask = np.arange(max_len)[None] < np.array([len(r) for r in rows])[:, None]
    return tokens, mask


# --------------------------------------------------------------------------- tfds builder + grain


def _builder_cls():
    """The tfds builder class, defined on first use (tfds import is slow)."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class ScenesConfig(tfds.core.BuilderConfig):
        source: str = "digits"
        canvas: int = 48
        small: int = 14
        large: int = 22
        num_train: int = 20000
        num_test: int = 2000
        seed: int = 0

    class LmJaxScenes(tfds.core.GeneratorBasedBuilder):
        """Composed scenes of real images with layout captions (see lm_jax.data.scenes)."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIG_CLS = ScenesConfig

        def _info(self):
            c = self.builder_config
            t = tfds.features.Tensor
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": t(shape=(c.canvas, c.canvas, 1), dtype=np.uint8),
                        "caption": tfds.features.Text(),
                        "labels": t(shape=(MAX_ITEMS,), dtype=np.int64),
                        "cells": t(shape=(MAX_ITEMS,), dtype=np.int64),
                        "sizes": t(shape=(MAX_ITEMS,), dtype=np.int64),
                        "num_items": t(shape=(), dtype=np.int64),
                        "phrasing": t(shape=(), dtype=np.int64),
                    }
                ),
                description="1-3 real items on a canvas, captioned from class/position/size.",
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples("train"),
                "test": self._generate_examples("test"),
            }

        def _generate_examples(self, split):
            c = self.builder_config
            spec = SceneSpec(c.canvas, c.small, c.large)
            comp = SceneComposer(load_images(c.source, split), spec)
            rng = np.random.default_rng([c.seed, split == "test"])
            for i in range(c.num_train if split == "train" else c.num_test):
                yield i, comp.example(rng, heldout=split == "test")

    _BUILDER = (LmJaxScenes, ScenesConfig)
    return _BUILDER


_BUILDER = None


def build_scenes(
    data_dir: str,
    source: str = "auto",
    spec: SceneSpec = SceneSpec(),
    num_train: int = 20000,
    num_test: int = 2000,
    seed: int = 0,
):
    """Prepare (once) and return the tfds scenes builder (array_record files under data_dir)."""
    builder_cls, config_cls = _builder_cls()
    source = resolve_source(source)
    name = re.sub(r"[^a-z0-9_]", "_", f"{source}_c{spec.canvas}_{spec.small}_{spec.large}")
    name += f"_n{num_train}_{num_test}_s{seed}_p{len(PHRASINGS)}"
    cfg = config_cls(
        name=name, source=source, canvas=spec.canvas, small=spec.small, large=spec.large,
        num_train=num_train, num_test=num_test, seed=seed,
    )  # fmt: skip
    builder = builder_cls(config=cfg, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def class_names_of(builder) -> tuple[str, ...]:
    return FASHION_CLASSES if builder.builder_config.source == "fashion_mnist" else DIGIT_CLASSES


def scene_batches(
    builder, split: str, batch_size: int, tok: WordTokenizer, max_len: int, *, seed: int = 0,
    shuffle: bool = True, repeat: bool = True, bos: bool = False, drop_remainder: bool = True,
    rephrase: bool = False, class_only_fraction: float | None = None,
):  # fmt: skip
    """grain pipeline over the stored scenes: batches of images uint8 [B, H, W, 1], tokens /
    mask [B, max_len] (the stored caption, EOS-terminated; BOS first with bos=True), labels,
    cells, sizes, num_items.

    rephrase=True (training-split augmentation) re-captions every scene, each time it is read,
    in a training phrasing drawn at random (seeded by `seed` and the element's position in the
    repeated stream), instead of the one phrasing stored with it. class_only_fraction sets the
    probability of the classes-only phrasing ("a photo of a {cls} and a {cls}") among those draws
    (default: uniform over the training phrasings)."""
    import grain

    if rephrase and split != "train":
        raise SceneError(
            f"rephrase=True is a training augmentation; split {split!r} keeps its own captions."
        )
    if class_only_fraction is not None and not (rephrase and 0.0 <= class_only_fraction <= 1.0):
        raise SceneError(
            f"class_only_fraction={class_only_fraction} needs rephrase=True and a value in [0, 1]."
        )
    src = builder.as_data_source(split=split)
    names = class_names_of(builder)
    phrasings = np.asarray(TRAIN_PHRASINGS)
    weights = None
    if class_only_fraction is not None:
        only = phrasings == CLASS_ONLY_PHRASING
        weights = np.where(only, class_only_fraction, (1 - class_only_fraction) / (~only).sum())

    def to_example(row, rng=None):
        if rng is not None:
            text = layout_captions(row, names, (int(rng.choice(phrasings, p=weights)),))[0]
        else:
            text = row["caption"]
            text = text.decode() if isinstance(text, bytes) else str(text)
        tokens, mask = encode_texts(tok, [text], max_len, bos=bos)
        return {
            "image": np.asarray(row["image"], np.uint8),
            "tokens": tokens[0],
            "mask": mask[0],
            **{k: np.asarray(row[k]) for k in ("labels", "cells", "sizes", "num_items")},
        }

    ds = grain.MapDataset.source(src)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.random_map(to_example, seed=seed) if rephrase else ds.map(to_example)
    return ds.batch(batch_size, drop_remainder=drop_remainder)
