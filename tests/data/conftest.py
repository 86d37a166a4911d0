"""Small corpora for the data tests."""

import numpy as np
import pytest


@pytest.fixture
def corpus(tmp_path) -> str:
    """`file:` source of 6 documents of different lengths (a few longer than seq_len 16)."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "and", "of", "to", "a", "é", "Ω"]
    for i in range(6):
        text = " ".join(rng.choice(words, size=5 + 17 * i)) + "\n"
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return f"file:{tmp_path}/doc*.txt"


@pytest.fixture
def tiny_text_file(tmp_path, shared_data) -> str:
    """The first 40 kB of tinyshakespeare as a file (enough to train small tokenizers)."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:40_000]
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    return str(path)
