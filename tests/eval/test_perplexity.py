"""Perplexity / bits per byte: exact counting under padding and packing, sharding, tokenizer
independence of bits per byte, window coverage, bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import ModelConfig
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.eval.perplexity import (
    EvalError,
    Piece,
    evaluate_batches,
    perplexity,
    text_windows,
)
from lm_jax.nn.transformer import Transformer
from lm_jax.sharding import make_mesh

TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "ok",
]


@pytest.fixture(scope="module")
def byte_model():
    cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=4, max_len=64)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, nn.unbox(params)


def reference_nll(cfg, params, ids, window):
    """Unpadded single sequences, one forward per window, plain log-softmax."""
    nll, count = 0.0, 0
    for p in text_windows(ids, window):
        logits = Transformer(cfg).apply({"params": params}, jnp.asarray(p.inputs)[None])[0]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        tok = np.take_along_axis(np.asarray(lp), p.targets[:, None], 1)[:, 0]
        nll -= float(np.sum(tok * p.mask))
        count += int(p.mask.sum())
    return nll, count


def test_windows_score_every_token_once():
    ids = np.arange(100)
    for window, stride in [(16, None), (16, 16), (16, 5), (16, 1), (7, 3), (200, None)]:
        pieces = text_windows(ids, window, stride)
        counted = np.concatenate([p.targets[p.mask > 0] for p in pieces])
        assert counted.tolist() == list(range(1, 100)), (window, stride)
        assert all(len(p) <= window for p in pieces)
        for p in pieces:  # targets are the next token of the inputs
            assert (p.targets == p.inputs + 1).all()
        if stride is not None and stride < window:  # at least window - stride of context
            for p in pieces[1:]:
                first = int(np.flatnonzero(p.mask)[0])
                assert first + 1 >= window - stride


def test_padded_and_packed_equal_unpadded_single_sequences(byte_model):
    cfg, params = byte_model
    tok = ByteTokenizer()
    ref_nll, ref_count = 0.0, 0
    for t in TEXTS:
        n, c = reference_nll(cfg, params, tok.encode(t), 32)
        ref_nll, ref_count = ref_nll + n, ref_count + c
    ref_ppl = math.exp(ref_nll / ref_count)
    for pack, batch_size in [(True, 3), (False, 4), (True, 1), (False, 5)]:
        r = perplexity(cfg, params, tok, TEXTS, window=32, batch_size=batch_size, pack=pack)
        assert r.tokens == ref_count
        assert r.perplexity == pytest.approx(ref_ppl, rel=1e-5)
        assert r.nll == pytest.approx(ref_nll, rel=1e-5)


def test_packing_actually_packs(byte_model):
    cfg, params = byte_model
    from lm_jax.eval.perplexity import pack_pieces

    pieces = [Piece(np.arange(n), np.arange(n) + 1, np.ones(n, np.float32)) for n in (5, 7, 20, 3)]
    rows = pack_pieces(pieces, 32)
    assert len(rows) == 2
    assert rows[0]["segment_ids"].tolist() == [1] * 5 + [2] * 7 + [3] * 20
    assert rows[1]["segment_ids"].tolist() == [1] * 3 + [0] * 29
    assert rows[0]["positions"][5:12].tolist() == list(range(7))
    assert rows[0]["loss_mask"].sum() == 32 and rows[1]["loss_mask"].sum() == 3


def test_row_batches_with_padding_rows_and_masks(byte_model):
    """Dict batches (as from the data pipeline): masked rows/slots add nothing."""
    cfg, params = byte_model
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (3, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    full = evaluate_batches(cfg, params, [batch])
    padded = {
        "inputs": np.concatenate([batch["inputs"], rng.integers(0, 256, (2, 16))]),
        "targets": np.concatenate([batch["targets"], rng.integers(0, 256, (2, 16))]),
        "loss_mask": np.concatenate([np.ones((3, 16)), np.zeros((2, 16))]),
    }
    r = evaluate_batches(cfg, params, [padded])
    assert r.tokens == full.tokens == 48
    assert r.nll == pytest.approx(full.nll, rel=1e-6)


@pytest.mark.parametrize("spec", ["data:8", "data:2,fsdp:2,tensor:2"])
def test_sharded_equals_single_device(byte_model, spec):
    cfg, params = byte_model
    tok = ByteTokenizer()
    single = perplexity(cfg, params, tok, TEXTS, window=32, batch_size=3)
    sharded = perplexity(cfg, params, tok, TEXTS, window=32, batch_size=3, mesh=make_mesh(spec))
    assert sharded.tokens == single.tokens
    assert sharded.nll == pytest.approx(single.nll, rel=1e-5)
    assert sharded.bits_per_byte == pytest.approx(single.bits_per_byte, rel=1e-5)


# --------------------------------------------------------------------------- bits per byte


class PermutedBytes:
    """Byte tokenizer whose ids are a permutation of the bytes (a renamed vocabulary)."""

    bos_id = None
    eos_id = None
    pad_id = 0

    def __init__(self, perm):
        self.perm = np.asarray(perm)
        self.inv = np.argsort(self.perm)
        self.vocab_size = len(perm)

    def encode(self, text):
        return [int(self.perm[b]) for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(int(self.inv[i]) for i in ids).decode("utf-8", errors="replace")


def test_bpb_same_under_vocabulary_renaming_and_by_hand(byte_model):
    cfg, params = byte_model
    text = TEXTS[1] + " " + TEXTS[3]  # one window (< max_len) for the hand computation
    perm = np.random.default_rng(1).permutation(257)
    renamed = jax.tree.map(lambda x: x, params)
    emb = np.asarray(params["embed_tokens"]["embedding"])
    new = np.empty_like(emb)
    new[perm] = emb  # row of new id perm[b] = row of byte b
    renamed["embed_tokens"]["embedding"] = jnp.asarray(new)
    a = perplexity(cfg, params, ByteTokenizer(), text, window=64)
    b = perplexity(cfg, renamed, PermutedBytes(perm), text, window=64)
    assert a.bytes == b.bytes == len(text.encode()) - 1  # the first byte is context only
    assert b.bits_per_byte == pytest.approx(a.bits_per_byte, rel=1e-6)
    # By hand: one forward over the whole text, nats / ln 2 / scored bytes.
    ids = np.asarray(ByteTokenizer().encode(text))
    logits = Transformer(cfg).apply({"params": params}, jnp.asarray(ids[:-1])[None])[0]
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    nats = -np.sum(lp[np.arange(len(ids) - 1), ids[1:]])
    assert a.bits_per_byte == pytest.approx(nats / math.log(2) / (len(ids) - 1), rel=1e-5)


ALPHA = "ab c"  # a bigram (Markov) character model over these, with a BOS state


def bigram_table():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(len(ALPHA)), size=len(ALPHA) + 1)  # [m + 1 (prev incl. BOS), m]
    return np.log(p)


class CharTok:
    def __init__(self):
        self.bos_id, self.eos_id, self.pad_id = len(ALPHA), None, 0
        self.vocab_size = len(ALPHA) + 1

    def encode(self, text):
        return [ALPHA.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHA[i] for i in ids if i < len(ALPHA))


class PairTok:
    """Two characters per token (a coarser tokenization of the same text)."""

    def __init__(self):
        m = len(ALPHA)
        self.bos_id, self.eos_id, self.pad_id = m * m, None, 0
        self.vocab_size = m * m + 1

    def encode(self, text):
        m = len(ALPHA)
        return [ALPHA.index(text[i]) * m + ALPHA.index(text[i + 1]) for i in range(0, len(text), 2)]

    def decode(self, ids):
        m = len(ALPHA)
        return "".join(ALPHA[i // m] + ALPHA[i % m] for i in ids if i < m * m)


def test_bpb_tokenizer_independent_char_vs_pairs():
    """The same character-level probabilities, expressed per character and per character pair:
    equal total nats and bits per byte (different bits per token), equal to a hand sum."""
    m = len(ALPHA)
    logp = jnp.asarray(bigram_table())  # [m + 1, m]

    def char_logits(params, inputs, positions, segment_ids):
        prev = jnp.where(inputs == m, m, inputs)
        out = logp[prev]  # [B, T, m]
        return jnp.concatenate([out, jnp.full(out.shape[:-1] + (1,), -1e9)], -1)

    def pair_logits(params, inputs, positions, segment_ids):
        prev = jnp.where(inputs == m * m, m, inputs % m)  # last character of the previous pair
        first = logp[prev]  # [B, T, m]: log p(a | prev)
        pair = first[..., :, None] + logp[None, None, :m, :]  # [B, T, m, m]: + log p(c | a)
        flat = pair.reshape(pair.shape[:-2] + (m * m,))
        return jnp.concatenate([flat, jnp.full(flat.shape[:-1] + (1,), -1e9)], -1)

    text = "ab cab  cbba c abcc ba" * 3
    assert len(text) % 2 == 0
    a = perplexity(None, {}, CharTok(), text, window=8, add_bos=True, logits_fn=char_logits)
    b = perplexity(None, {}, PairTok(), text, window=8, add_bos=True, logits_fn=pair_logits)
    table = bigram_table()
    prev, nats = m, 0.0
    for ch in text:
        nats -= table[prev, ALPHA.index(ch)]
        prev = ALPHA.index(ch)
    assert a.tokens == len(text) and b.tokens == len(text) // 2
    assert a.bytes == b.bytes == len(text)
    assert a.nll == pytest.approx(nats, rel=1e-5)
    assert b.nll == pytest.approx(nats, rel=1e-5)
    assert a.bits_per_byte == pytest.approx(b.bits_per_byte, rel=1e-5)
    assert b.bits_per_token == pytest.approx(2 * a.bits_per_token, rel=1e-5)


# --------------------------------------------------------------------------- bad input


def test_empty_inputs_raise(byte_model):
    cfg, params = byte_model
    tok = ByteTokenizer()
    with pytest.raises(EvalError, match="empty"):
        perplexity(cfg, params, tok, [], window=32)
    with pytest.raises(EvalError, match="fewer than 2 tokens"):
        perplexity(cfg, params, tok, ["x", ""], window=32)
    with pytest.raises(EvalError, match="no scored tokens"):
        evaluate_batches(cfg, params, [])
    with pytest.raises(EvalError, match="max_len"):
        perplexity(cfg, params, tok, TEXTS, window=128)
    with pytest.raises(EvalError, match="stride"):
        text_windows([1, 2, 3], 4, 5)
