"""GGUF tokenizers rebuilt from metadata (lm_jax.data.gguf_tokenizer) against the library that
defines them: a SentencePiece BPE model (trained here on Tiny Shakespeare, with and without the
dummy prefix) written into GGUF metadata the way llama.cpp's converter writes it encodes and
decodes every held-out line exactly as `sentencepiece` itself does. The real Gemma 3 270M
vocabulary against transformers' GGUF loader lives in tests/parity/test_gemma3_gguf.py."""

import io

import numpy as np
import pytest

from lm_jax.data.gguf_tokenizer import build_from_gguf_metadata, sentencepiece_merges
from lm_jax.data.hf_tokenizer import HFTokenizer
from lm_jax.errors import TokenizerError
from lm_jax.scoring import token_byte_lengths

EXTRA = [
    "a  b   c    d", "  two leading spaces", "trailing  ", "tab\there", "x\n\ny",
    "emoji 😀 and 中文 (not in a Shakespeare vocabulary: byte fallback)", "", " ", "élève",
    "kin" "gdom", "KING RICHARD III",
]  # fmt: skip


def _train(text_file, add_dummy_prefix):
    import sentencepiece as spm

    # Gemma-like without the prefix (a newline and a run of spaces are user-defined pieces),
    # Llama-2-like with it (none: see lm_jax.data.gguf_tokenizer)
    user_defined = [] if add_dummy_prefix else ["\n", "\u2581\u2581"]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=text_file, model_writer=out, vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, user_defined_symbols=user_defined,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(out.getvalue())
    return sp, out.getvalue()


def _gguf_metadata(sp, proto, add_dummy_prefix):
    """tokenizer.* metadata as llama.cpp's convert_hf_to_gguf writes a SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(proto)
    tokens, scores, types = [], [], []
    for piece in m.pieces:
        text = piece.piece
        if piece.type == pb.ModelProto.SentencePiece.USER_DEFINED:
            text = text.replace("\u2581", " ")  # llama.cpp spells user-defined '▁' as a space
        tokens.append(text)
        scores.append(piece.score)
        types.append(int(piece.type))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_space_prefix": add_dummy_prefix,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
def test_sentencepiece_gguf_tokenizer_equals_sentencepiece(
    tiny_text_file, add_dummy_prefix, shared_data
):
    sp, proto = _train(tiny_text_file, add_dummy_prefix)
    tok = HFTokenizer.from_gguf_metadata(_gguf_metadata(sp, proto, add_dummy_prefix))
    assert tok.vocab_size == sp.GetPieceSize()
    held_out = (shared_data / "tinyshakespeare" / "input.txt").read_text()[200_000:230_000]
    lines = [line for line in held_out.split("\n") if line] + EXTRA
    for line in lines:
        want = sp.EncodeAsIds(line)
        got = tok.encode(line, add_special_tokens=False)
        assert got == want, (line, got, want)
        assert tok.encode(line) == [sp.bos_id()] + want  # add_bos_token
        assert tok.decode(got) == sp.DecodeIds(want) == line, line
    # Control tokens written in the text are matched whole, as transformers and llama.cpp
    # (parse_special) do; sentencepiece itself spells them out piece by piece.
    got = tok.encode("<s>hi</s>", add_special_tokens=False)
    assert got == [sp.bos_id()] + sp.EncodeAsIds("hi") + [sp.eos_id()]
    assert tok.decode(got, skip_special_tokens=True) == sp.DecodeIds(sp.EncodeAsIds("hi"))
    # a whole passage at once (newlines are user-defined pieces, matched whole)
    passage = held_out[:4000]
    assert tok.encode(passage, add_special_tokens=False) == sp.EncodeAsIds(passage)
    # bits per byte: the per-token byte counts add up to the text's UTF-8 length (and the
    # prefixed space)
    lengths = token_byte_lengths(tok, tok.vocab_size)
    for line in lines[:200] + EXTRA:
        ids = tok.encode(line, add_special_tokens=False)
        want = len(line.encode("utf-8")) + (add_dummy_prefix and bool(line))
        assert lengths[np.asarray(ids, int)].sum() == want, line


def test_merges_rank_by_merged_piece_score_then_id():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "<0x61>"]
    scores = [0, 0, 0, -1.0, -0.5, -2.0, 0]
    types = [1, 1, 1, 1, 1, 1, 6]
    merges = sentencepiece_merges(tokens, scores, types)
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_gguf_tokenizer_bad_metadata_is_a_clear_error():
    with pytest.raises(TokenizerError, match="'bert' is not supported.*'gpt2'.*'llama'"):
        build_from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="scores"):
        build_from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        build_from_gguf_metadata({"tokenizer.ggml.model": "llama"})
