"""The sequence-labelling tasks and models of `experiments/train_tagger.py`.

Tasks (`load_tagging_data`), each train / dev / test of (words, tags) sentences:
- `pos_brown`: Brown POS tags, split by file (`lm_jax.data.tagged_corpora.brown_split`), scored
  on the full tag set and on base tags (`base_tag`);
- `ner_wnut16`: WNUT-16 NER (BIO), a seeded held-out split by sentence (test = `held_out` of
  the sentences, dev = `held_out / 2` of the rest), scored by entity F1 (seqeval);
- `files`: CoNLL-style `token<TAB>tag` files (train / dev / test), scored as NER when every tag
  is `O`, `B-x` or `I-x`, else as POS.

Models (`build_encoder`): a BERT-family folder (default: the packaged all-MiniLM-L6-v2) with a
token-classification head, its trunk pretrained or (`from_scratch`) the same architecture and
tokenizer with random weights.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from lm_jax.configs.encoder import EncoderConfig
from lm_jax.data import tagged_corpora as tc
from lm_jax.errors import DataSourceError
from lm_jax.eval.tagging import MostFrequentTag, ner_scores, pos_scores

TASKS = ("pos_brown", "ner_wnut16", "files")


@dataclasses.dataclass
class TaggingData:
    name: str
    splits: dict[str, list[tc.TaggedSentence]]  # train / dev / test
    score: Callable[[list, list], dict]  # (gold tags, predicted tags) -> metrics
    note: str  # how the split was made

    def labels(self) -> list[str]:
        return tc.tag_set(self.splits["train"])

    def baseline(self) -> dict:
        """The most-frequent-tag baseline's scores on dev and test."""
        train = self.splits["train"]
        mft = MostFrequentTag([w for w, _ in train], [t for _, t in train])
        out = {}
        for split in ("dev", "test"):
            sents = self.splits[split]
            gold = [t for _, t in sents]
            for k, v in self.score(gold, mft.predict([w for w, _ in sents])).items():
                out[f"{split}_{k}"] = v
        return out


def _is_bio(tags: Sequence[str]) -> bool:
    return all(t == "O" or t[:2] in ("B-", "I-") for t in tags)


def load_tagging_data(
    name: str, data_dir: str, *, held_out: float = 0.2, split_seed: int = 0,
    files: dict[str, str] | None = None,
) -> TaggingData:  # fmt: skip
    """Task `name` (module docstring); `files` = {train, dev, test} paths for `files`."""
    if name == "pos_brown":
        path = os.path.join(data_dir, "brown", "brown.tar.gz")
        if not os.path.exists(path):
            path = os.path.join(data_dir, "brown")
        splits = tc.brown_split(tc.read_brown(path))
        score = lambda g, p: pos_scores(g, p, tc.base_tag)  # noqa: E731
        return TaggingData(name, splits, score, "Brown by file: test = files numbered *5, dev = *0")
    if name == "ner_wnut16":
        sents = tc.read_conll(os.path.join(data_dir, "wnut16", "train.tsv.gz"))
        rest, test = tc.held_out_split(sents, held_out, split_seed)
        train, dev = tc.held_out_split(rest, held_out / 2, split_seed + 1)
        note = (
            f"WNUT-16 train by sentence, seed {split_seed}: test {held_out:.0%}, "
            f"dev {held_out / 2:.0%} of the rest"
        )
        return TaggingData(name, {"train": train, "dev": dev, "test": test}, ner_scores, note)
    if name == "files":
        files = files or {}
        missing = [k for k in ("train", "dev", "test") if not files.get(k)]
        if missing:
            raise DataSourceError(
                "--task=files needs --train_file, --dev_file and --test_file (CoNLL "
                f"token<TAB>tag); missing: {', '.join(missing)}"
            )
        splits = {k: tc.read_conll(files[k]) for k in ("train", "dev", "test")}
        bio = _is_bio([t for s in splits.values() for _, ts in s for t in ts])
        return TaggingData(name, splits, ner_scores if bio else pos_scores, "given files")
    raise DataSourceError(f"unknown tagging task {name!r}; available: {', '.join(TASKS)}")


def check_labels(data: TaggingData, labels: Sequence[str], strict: bool) -> dict:
    """Words of dev / test whose gold tag is not a label. `strict`: that is an error (a given
    label set); otherwise they are counted (and can only be mispredicted)."""
    known, out = set(labels), {}
    for split in ("train", "dev", "test"):
        bad = sorted({t for _, ts in data.splits[split] for t in ts if t not in known})
        if bad and (strict or split == "train"):
            raise DataSourceError(
                f"{split} has tags outside the label set ({', '.join(bad[:5])}"
                f"{', ...' if len(bad) > 5 else ''}); add them to --labels or fix the data"
            )
        if split != "train":
            out[f"{split}_words_with_unseen_tags"] = sum(
                t not in known for _, ts in data.splits[split] for t in ts
            )
    return out


def build_encoder(init: str, num_labels: int, *, from_scratch: bool = False,
                  classifier_dropout: float | None = None):  # fmt: skip
    """(EncoderConfig with a token head, tokenizer, pretrained trunk params or None)."""
    import json

    from lm_jax.convert import hf_bert
    from lm_jax.data.hf_tokenizer import HFTokenizer

    directory = hf_bert.resolve_dir(init)
    tokenizer = HFTokenizer.from_pretrained_dir(directory)
    if from_scratch:
        path = os.path.join(directory, hf_bert.CONFIG_FILE)
        if not os.path.isfile(path):
            raise DataSourceError(f"{path!r} not found: a BERT folder needs config.json")
        with open(path) as f:
            cfg: EncoderConfig = hf_bert.config_from_hf(json.load(f), "token", pooler=False)
        params = None
    else:
        cfg, params = hf_bert.from_hf(directory, head="none")
        params = {k: v for k, v in params.items() if k != "pooler"}
    cfg = cfg.replace(head="token", pooler=False, num_labels=num_labels,
                      classifier_dropout=classifier_dropout)  # fmt: skip
    cfg = cfg.replace(model=cfg.model.replace(param_dtype="float32"))
    return cfg, tokenizer, params
