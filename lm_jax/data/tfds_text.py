"""A real tfds builder over local text files, stored as array_record, read without TensorFlow.

    path = build_text_dataset(["a.txt", "b.txt"], data_dir="/tmp/tfds", name="my_corpus")
    load_texts(f"tfds_dir:{path}", "train")                  # through our sources
    tfds.data_source("my_corpus", data_dir="/tmp/tfds", split="train")  # or tfds directly

Features: {"id": int64 (example id), "text": Text}. Without TensorFlow, "text" reads back as
UTF-8 bytes: decode it (`sources.load_memory_texts` does).
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence

import numpy as np

from lm_jax.data.sources import SPLITS, DataSourceError, paragraphs, read_text, split_text

VERSION = "1.0.0"


class _LocalTextBuilder:
    """Mixin body of the generated builder class; `_lm_jax_docs` maps split -> [(id, text)]."""

    VERSION = None  # set per generated class
    _lm_jax_docs: dict = {}

    def _info(self):
        import tensorflow_datasets as tfds

        return self.dataset_info_from_configs(
            description="Local plain-text documents (lm_jax.data.tfds_text).",
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Scalar(dtype=np.int64), "text": tfds.features.Text()}
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._lm_jax_docs}

    def _generate_examples(self, split):
        for example_id, text in self._lm_jax_docs[split]:
            yield int(example_id), {"id": int(example_id), "text": text}


def _documents(files, val_fraction: float, docs: str) -> dict[str, list[tuple[int, str]]]:
    if isinstance(files, Mapping):
        per_split = {split: [read_text(f) for f in fs] for split, fs in files.items()}
    else:
        texts = [read_text(f) for f in files]
        per_split = {s: [split_text(t, s, val_fraction) for t in texts] for s in SPLITS}
    out, next_id = {}, 0
    for split, texts in per_split.items():
        items = []
        for t in texts:
            for d in paragraphs(t) if docs == "paragraph" else [t]:
                if d.strip():
                    items.append((next_id, d))
                next_id += 1
        if not items:
            raise DataSourceError(f"build_text_dataset: split {split!r} has no text ({files})")
        out[split] = items
    return out


def build_text_dataset(
    files: Sequence[str] | Mapping[str, Sequence[str]],
    data_dir: str,
    name: str,
    *,
    val_fraction: float = 0.05,
    docs: str = "file",
) -> str:
    """Build tfds dataset `name` under `data_dir` from local UTF-8 text files; return its folder.

    `files`: a list (each file split into train head / validation tail by `val_fraction`, as the
    "file:" source does) or a mapping split name -> files. `docs`: "file" (one example per file
    part) or "paragraph" (one example per blank-line separated paragraph). Example ids are unique
    across splits. Stored as array_record, so `tfds.data_source` and grain read it without TF.
    """
    import tensorflow_datasets as tfds

    if docs not in ("file", "paragraph"):
        raise DataSourceError(f"docs must be 'file' or 'paragraph', got {docs!r}")
    if not name.isidentifier() or name != name.lower():
        raise DataSourceError(f"tfds dataset name must be a lower_snake_case identifier: {name!r}")
    flat = [f for fs in files.values() for f in fs] if isinstance(files, Mapping) else list(files)
    missing = [f for f in flat if not os.path.isfile(f)]
    if not flat or missing:
        raise DataSourceError(f"build_text_dataset: no such file(s) {missing or flat!r}")
    documents = _documents(files if isinstance(files, Mapping) else flat, val_fraction, docs)
    body = {
        "name": name,
        "VERSION": tfds.core.Version(VERSION),
        "_lm_jax_docs": documents,
        "__module__": __name__,
    }
    cls = types.new_class(
        "".join(p.title() for p in name.split("_")) or "LocalText",
        (_LocalTextBuilder, tfds.core.GeneratorBasedBuilder),
        {"skip_registration": True},
        lambda ns: ns.update(body),
    )
    builder = cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir
