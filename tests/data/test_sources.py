"""Text sources: embedded Shakespeare, nanoGPT split, files, paragraphs, tfds builder (no TF)."""

import importlib.util
import sys

import pytest

from lm_jax.configs.base import ConfigError
from lm_jax.data import DataConfig, DataSourceError, load_texts
from lm_jax.data.sources import ptb_lines, read_text, shakespeare_files


def test_embedded_shakespeare_is_42_works_split_95_5_per_work():
    files = shakespeare_files()
    assert len(files) == 42 and all(f.endswith("_gut.txt") for f in files)
    train, val = load_texts("shakespeare", "train"), load_texts("shakespeare", "validation")
    assert [i for i, _ in train] == [i for i, _ in val] == list(range(42))
    for (_, head), (_, tail), path in zip(train, val, files):
        text = read_text(path)
        assert head + tail == text and tail.startswith(("\n", text[len(head)]))
        assert 0.04 < len(tail) / len(text) < 0.07
    assert sum(len(t) for _, t in train) > 4_500_000


def test_tinyshakespeare_is_nanogpts_90_10_character_split(shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    text = path.read_text()
    [(_, train)] = load_texts(f"tinyshakespeare:{path}", "train")
    [(_, val)] = load_texts(f"tinyshakespeare:{path}", "validation")
    n = int(len(text) * 0.9)
    assert train == text[:n] and val == text[n:] and len(val) == 111_540


def test_ptb_source_is_mikolovs_train_and_valid_splits():
    (train,) = load_texts("ptb", "train")
    (valid,) = load_texts("ptb", "validation")
    assert train[0] == 0 and valid[0] == 1
    lines = train[1].splitlines()
    assert len(lines) == 42_068 and sum(len(ln.split()) for ln in lines) == 887_521
    assert len(valid[1].splitlines()) == 3_370 and "<unk>" in train[1]
    assert DataConfig(source="ptb").source == "ptb"
    with pytest.raises(DataSourceError, match="train, valid or test"):
        ptb_lines("validation")


def test_file_and_paragraph_sources(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n\n" * 20 + "end\n")
    (tmp_path / "b.txt").write_text("solo paragraph\n" * 30)
    train = load_texts(f"file:{tmp_path}/*.txt", "train")
    val = load_texts(f"file:{tmp_path}/*.txt", "validation", val_fraction=0.2)
    assert [i for i, _ in train] == [0, 1] and val[1][1] == "solo paragraph\n" * 6
    paras = load_texts(f"paragraphs:{tmp_path}/*.txt", "train")
    vparas = load_texts(f"paragraphs:{tmp_path}/*.txt", "validation")
    assert paras[0][1] == "one\ntwo" and paras[1][1] == "three"
    ids = [i for i, _ in paras + vparas]
    assert ids == list(range(len(ids)))  # unique over both splits


def test_missing_empty_and_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="no such file.*nope"):
        load_texts(f"file:{tmp_path}/nope*.txt", "train")
    with pytest.raises(DataSourceError, match="no such file.*missing.txt"):
        load_texts(f"tinyshakespeare:{tmp_path}/missing.txt", "train")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataSourceError, match="no text for split 'train'.*empty.txt"):
        load_texts(f"file:{tmp_path}/empty.txt", "train")
    with pytest.raises(DataSourceError, match="unknown data source"):
        load_texts("ftp:somewhere", "train")
    with pytest.raises(DataSourceError, match="split must be one of"):
        load_texts("shakespeare", "dev")
    with pytest.raises(DataSourceError, match="tfds_dir .*: no such directory"):
        load_texts(f"tfds_dir:{tmp_path}/none", "train")
    with pytest.raises(ConfigError, match="data.source: unknown data source"):
        DataConfig(source="ftp:x")


def test_tfds_builder_builds_and_reads_back_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds

    from lm_jax.data.tfds_text import build_text_dataset

    files = []
    for i in range(3):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(f"Part {i}, first line é.\n" * 30 + f"last of {i}\n")
    path = build_text_dataset([str(f) for f in files], str(tmp_path / "tfds"), "lm_jax_test_text")
    src = tfds.data_source("lm_jax_test_text", data_dir=str(tmp_path / "tfds"), split="train")
    assert len(src) == 3 and isinstance(src[0]["text"], bytes)
    builder = tfds.builder_from_directory(path)
    assert set(builder.info.splits.keys()) == {"train", "validation"}
    assert len(builder.as_data_source(split="validation")) == 3
    # through our source: same documents as the file: source, in file order, decoded
    for split in ("train", "validation"):
        assert [t for _, t in load_texts(f"tfds_dir:{path}", split)] == [
            t for _, t in load_texts(f"file:{tmp_path}/part*.txt", split)
        ]
    assert importlib.util.find_spec("tensorflow") is None and "tensorflow" not in sys.modules
