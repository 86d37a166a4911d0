"""Tokenizers: round trips, save/load, specs, and clear errors for bad files or sizes."""

import json

import pytest

from lm_jax.configs.base import ConfigError
from lm_jax.data import (
    ByteTokenizer,
    CharTokenizer,
    DataConfig,
    SentencePieceTokenizer,
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
)
from lm_jax.data.sp_tokenizer import MODEL_FILE
from lm_jax.data.tokenizer import MANIFEST

TEXT = "To be, or not to be:\n  that is the question. é Ω\n\n"


def _roundtrip_and_reload(tok, tmp_path, text=TEXT):
    ids = tok.encode(text)
    assert tok.encode_array(text).tolist() == ids
    assert tok.decode(ids) == text
    assert max(ids) < tok.vocab_size
    tok.save(str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.encode(text) == ids and (again.eos_id, again.bos_id) == (tok.eos_id, tok.bos_id)
    return again


def test_byte_tokenizer(tmp_path):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (257, 256, None)
    assert tok.encode("é") == [0xC3, 0xA9]
    _roundtrip_and_reload(tok, tmp_path)
    both = ByteTokenizer(specials=("eos", "bos"))
    assert (both.vocab_size, both.eos_id, both.bos_id) == (258, 256, 257)
    _roundtrip_and_reload(both, tmp_path / "b")
    assert ByteTokenizer(specials=()).vocab_size == 256
    with pytest.raises(TokenizerError, match="specials"):
        ByteTokenizer(specials=("sep",))


def test_char_tokenizer(tmp_path):
    tok = CharTokenizer.from_texts([TEXT, "xyz"])
    assert tok.chars == "".join(sorted(set(TEXT + "xyz"))) and tok.eos_id is None
    _roundtrip_and_reload(tok, tmp_path)
    for encode in (tok.encode, tok.encode_array):
        with pytest.raises(TokenizerError, match=r"\['#'\] are not in this char"):
            encode("to # be")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trains_roundtrips_and_reloads(tmp_path, tiny_text_file, model_type):
    text = open(tiny_text_file).read()
    tok = build_tokenizer(f"sentencepiece:{model_type}:400", [(0, text)])
    assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert len(tok.encode(text[:2000])) < 1500  # it learnt merges (~80 beyond bytes+chars)
    _roundtrip_and_reload(tok, tmp_path, TEXT + "unseen: 😀\n")  # byte fallback, newlines kept
    from_file = SentencePieceTokenizer.train(vocab_size=400, input_file=tiny_text_file)
    assert from_file.decode(from_file.encode(TEXT)) == TEXT


def test_build_tokenizer_specs(tmp_path):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    assert build_tokenizer("char", ["ba", (7, "c")]).chars == "abc"
    ByteTokenizer().save(str(tmp_path))
    assert isinstance(build_tokenizer(f"dir:{tmp_path}"), ByteTokenizer)
    for bad in ("sentencepiece:bpe", "sentencepiece:wordpiece:100", "gpt2", "char:x"):
        with pytest.raises(TokenizerError, match="tokenizer spec"):
            build_tokenizer(bad, ["abc"])
        with pytest.raises(ConfigError, match="data.tokenizer"):
            DataConfig(tokenizer=bad)
    with pytest.raises(TokenizerError, match="too high|vocab_size"):
        build_tokenizer("sentencepiece:bpe:50000", ["tiny corpus"])


def test_missing_and_corrupt_tokenizers_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="missing lm_jax_tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(TokenizerError, match="corrupt tokenizer manifest"):
        load_tokenizer(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "wordpiece9"}))
    with pytest.raises(TokenizerError, match="unknown kind 'wordpiece9'"):
        load_tokenizer(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "char"}))
    with pytest.raises(TokenizerError, match="chars.json.*missing or corrupt"):
        load_tokenizer(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(TokenizerError, match="sentencepiece model file .* is missing"):
        load_tokenizer(str(tmp_path))
    (tmp_path / MODEL_FILE).write_bytes(b"\x00not a model proto\xff" * 10)
    with pytest.raises(TokenizerError, match="corrupt sentencepiece model"):
        load_tokenizer(str(tmp_path))
    CharTokenizer("abc").save(str(tmp_path / "c"))
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    (tmp_path / "c" / MANIFEST).write_text(json.dumps({**manifest, "vocab_size": 99}))
    with pytest.raises(TokenizerError, match="vocab_size 99 but the files give 3"):
        load_tokenizer(str(tmp_path / "c"))


def test_vocab_larger_than_model_is_an_error():
    ByteTokenizer().check_fits(257)
    with pytest.raises(TokenizerError, match="larger than the model's vocab_size"):
        ByteTokenizer().check_fits(256)


def test_a_saved_word_tokenizer_loads_without_importing_its_module_first(tmp_path):
    import subprocess
    import sys

    save = (
        "from lm_jax.data.scenes import WordTokenizer; "
        f"WordTokenizer(['a', 'bag']).save('{tmp_path}')"
    )
    load = (
        "from lm_jax.data.tokenizer import load_tokenizer; "
        f"print(load_tokenizer('{tmp_path}').kind)"
    )
    subprocess.run([sys.executable, "-c", save], check=True)
    out = subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "word"
