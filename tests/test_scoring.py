"""The one scorer (lm_jax.scoring): values and LoRA-policy gradients against a direct
log_softmax reference, chunked head == whole head, sharded == single device, and the one
token_byte_lengths against the UTF-8 bytes of decoded text for byte, char, SentencePiece and HF
BPE tokenizers."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.align.policies import make_lm_policy
from lm_jax.align.samplers import SamplerConfig
from lm_jax.configs import ModelConfig, llama_style
from lm_jax.configs.lora import LoraConfig
from lm_jax.nn.transformer import Transformer
from lm_jax.scoring import EvalError, Scorer, jitted_score, score, token_byte_lengths
from lm_jax.sharding import make_mesh

TIED = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, max_len=32)
UNTIED = llama_style(vocab_size=61, d_model=32, num_layers=2, num_heads=2, max_len=32)


def _params(cfg, seed=0):
    p = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return nn.unbox(p)


def _batch(B=5, T=12, V=61, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[0] = 0.0  # an empty row
    seg = np.ones((B, T), np.int32)
    seg[1, 7:] = 2  # two packed documents in row 1 ...
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    pos[1, 7:] = np.arange(T - 7)
    seg[2, 9:] = 0  # ... padding in row 2
    mask[2, 9:] = 0.0
    targets[2, 9:] = 10_000  # out-of-range ids on padding must not leak
    return {"inputs": inputs, "targets": targets, "loss_mask": mask, "positions": pos,
            "segment_ids": seg}  # fmt: skip


def _reference(cfg, params, b, cand=None):
    logits = Transformer(cfg).apply(
        {"params": params}, b["inputs"], b["positions"], b["segment_ids"]
    )
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
    tgt = np.minimum(b["targets"], cfg.vocab_size - 1)
    tok = np.take_along_axis(lp, tgt[..., None], -1)[..., 0] * (b["loss_mask"] > 0)
    sums = (tok * b["loss_mask"]).sum(1)
    c = None
    if cand is not None:
        c = (lp[..., cand] * b["loss_mask"][..., None]).sum(1)  # [B, K]
    return tok, sums, c


@pytest.mark.parametrize("cfg", [TIED, UNTIED], ids=["tied", "untied"])
def test_score_equals_log_softmax_reference_and_chunked_equals_whole(cfg):
    params, b = _params(cfg), _batch()
    cand = np.array([3, 7, 60], np.int32)
    tok, sums, c = _reference(cfg, params, b, cand)
    jb = {k: jnp.asarray(v) for k, v in b.items()}
    for chunk in (0, 5, 12, 64):  # 5: T = 12 is padded to 15 inside
        s = jitted_score(cfg, chunk)(params, jb, jnp.asarray(cand))
        np.testing.assert_allclose(s.token_logprobs, tok, atol=2e-5)
        np.testing.assert_allclose(s.sums, sums, atol=1e-4)
        np.testing.assert_allclose(s.counts, b["loss_mask"].sum(1))
        np.testing.assert_allclose(s.candidates, c, atol=1e-4)
        assert np.isfinite(np.asarray(s.token_logprobs)).all()
        assert float(s.sums[0]) == 0.0 and float(s.counts[0]) == 0.0
    # per-row candidate ids [B, K] read the same numbers as broadcast [K] ones
    per_row = jitted_score(cfg, 5)(params, jb, jnp.asarray(np.tile(cand, (5, 1))))
    np.testing.assert_allclose(per_row.candidates, c, atol=1e-4)
    assert jitted_score(cfg, 5) is jitted_score(cfg, 5)  # one cache per (config, chunk)


def test_lora_policy_logprobs_and_gradients_equal_reference():
    cfg = llama_style(vocab_size=16, d_model=32, num_layers=2, num_heads=2, max_len=32)
    lora = LoraConfig(rank=2, alpha=4.0, targets=(".*",))
    scfg = SamplerConfig(max_new_tokens=6, stop_tokens=(1,), prompt=(2,))
    policy, adapters, frozen = make_lm_policy(cfg, _params(cfg), scfg, lora=lora)
    # adapters off zero (lora_b = 0 at init) so gradients reach every factor
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    adapters = tree.unflatten(
        [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 16, (4, 9)), jnp.int32)
    mask = jnp.asarray(rng.random((4, 9)) < 0.7, jnp.float32).at[:, 0].set(0.0)
    w = jnp.asarray([1.0, -0.5, 2.0, 0.3])

    def reference(a):
        params = policy.full_params(a, frozen)
        logits = Transformer(policy.config).apply({"params": params}, tokens[:, :-1])
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        tok = jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(tok * mask[:, 1:], axis=1)

    want, want_g = reference(adapters), jax.grad(lambda a: jnp.sum(w * reference(a)))(adapters)
    for chunk in (0, 3):
        chunked = make_lm_policy(cfg, _params(cfg), scfg, lora=lora, logits_chunk=chunk)[0]

        @jax.jit
        def loss(a, chunked=chunked):  # the scorer inside a jitted loss
            return jnp.sum(w * chunked.logprob_fn(a, frozen, tokens, mask))

        got = chunked.logprob_fn(adapters, frozen, tokens, mask)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        got_g = jax.grad(loss)(adapters)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
            assert float(jnp.max(jnp.abs(b))) > 0
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sharded_scorer_equals_single_device():
    cfg = UNTIED
    params, b = _params(cfg), _batch(B=5)  # 5 rows: padded to 8 over the mesh
    cand = np.array([3, 7, 60], np.int32)
    ref = Scorer(cfg, params).score(b, cand)
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    for chunk in (0, 5):
        sharded = Scorer(cfg, params, mesh, chunk=chunk)
        specs = [str(x.sharding.spec) for x in jax.tree.leaves(sharded.params)]
        assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
        got = sharded.score(b, cand)
        assert got.sums.shape == (5,) and got.candidates.shape == (5, 3)
        for x, y in zip(got, ref, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-4)
        nll, cnt = sharded.row_sums(b)
        np.testing.assert_allclose(nll, -ref.sums, atol=1e-4)
        np.testing.assert_array_equal(cnt, ref.counts)


def test_bad_scorer_input_is_a_clear_error():
    params = _params(TIED)
    with pytest.raises(EvalError, match="chunk must be"):
        Scorer(TIED, params, chunk=-1)
    with pytest.raises(EvalError, match="Transformer's head only"):
        Scorer(None, params, logits_fn=lambda *a: None, chunk=4)
    b = _batch()
    b["positions"] = b["positions"] + 30
    with pytest.raises(EvalError, match="max_len is 32"):
        Scorer(TIED, params).score(b)
    # the pure function is differentiable with respect to params (full fine-tuning)
    jb = {k: jnp.asarray(v) for k, v in _batch().items()}
    g = jax.grad(lambda p: jnp.sum(score(TIED, p, jb, chunk=4).sums))(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


# --------------------------------------------------------------------------- bytes per token

TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    " leading space, double  spaces and a trailing one ",
    "naïve café — Ωmega, 東京, emoji 🙂 and \u00e9\u0301",
    "\n\nnewlines\n",
]


def _check_bytes(tok, texts=TEXTS):
    lens = token_byte_lengths(tok, tok.vocab_size + 3)  # ids past the vocabulary count 0
    assert lens.shape == (tok.vocab_size + 3,) and not lens[tok.vocab_size :].any()
    for t in texts:
        ids = list(tok.encode(t))
        decoded = tok.decode(ids)
        assert decoded == t, (decoded, t)
        assert lens[ids].sum() == len(decoded.encode("utf-8")), t
    return lens


def _naive_bytes(tok, ids):  # what decoding each token alone gives (the old loop version)
    return sum(len(tok.decode([i]).encode("utf-8")) for i in ids)


def test_token_byte_lengths_byte_and_char():
    from lm_jax.data.byte_tokenizer import ByteTokenizer
    from lm_jax.data.char_tokenizer import CharTokenizer

    byte = ByteTokenizer(("eos", "bos"))
    lens = _check_bytes(byte)
    assert lens[256] == lens[257] == 0
    ids = byte.encode(TEXTS[2])
    assert _naive_bytes(byte, ids) != len(TEXTS[2].encode())  # lone bytes decode to U+FFFD
    _check_bytes(CharTokenizer("".join(TEXTS)))


@pytest.fixture(scope="module")
def corpus(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:40_000]
    return [text] + TEXTS


def test_token_byte_lengths_sentencepiece(corpus):
    from lm_jax.data.sp_tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer.train(corpus[:1], vocab_size=500)
    lens = _check_bytes(tok)
    assert lens[tok.bos_id] == lens[tok.eos_id] == lens[tok.pad_id] == lens[1] == 0
    ids = tok.encode(TEXTS[2])  # 東京 and 🙂 are not in the corpus: <0xNN> byte pieces
    assert any(tok.sp.IsByte(i) for i in ids)
    assert _naive_bytes(tok, ids) != len(TEXTS[2].encode())  # a lone byte piece is U+FFFD


def _hf_bpe(corpus, byte_level: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lm_jax.data.hf_tokenizer import HFTokenizer

    specials = ["<s>", "</s>"]
    if byte_level:  # GPT-2 / SmolLM2 style
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece style in tokenizer.json: '▁' for spaces, <0xNN> byte fallback
        tk = Tokenizer(models.BPE(byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tk.decoder = decoders.Sequence(
            [decoders.Metaspace(prepend_scheme="never"), decoders.ByteFallback(), decoders.Fuse()]
        )
        specials += [f"<0x{b:02X}>" for b in range(256)]
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tk.train_from_iterator(corpus[:1], trainer)
    if not byte_level:  # byte pieces are ordinary vocabulary, not special tokens
        vocab = tk.get_vocab()
        raw = json.loads(tk.to_str())["model"]["merges"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in raw]
        model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True)
        new = Tokenizer(model)
        new.pre_tokenizer, new.decoder = tk.pre_tokenizer, tk.decoder
        new.add_special_tokens(specials[:2])
        tk = new
    return HFTokenizer(tk, bos_id=tk.token_to_id("<s>"), eos_id=tk.token_to_id("</s>"))


@pytest.mark.parametrize("byte_level", [True, False], ids=["byte_level_bpe", "metaspace_bpe"])
def test_token_byte_lengths_hf_bpe(corpus, byte_level):
    tok = _hf_bpe(corpus, byte_level)
    lens = _check_bytes(tok)
    assert lens[tok.bos_id] == lens[tok.eos_id] == 0
    ids = tok.encode(TEXTS[2])
    if byte_level:  # pieces holding part of a character decode to U+FFFD alone
        assert _naive_bytes(tok, ids) != len(TEXTS[2].encode())
    else:
        assert any(tok.id_to_token(i).startswith("<0x") for i in ids)


def test_one_token_byte_lengths_for_pretraining_and_evaluate():
    import importlib

    import lm_jax.eval

    loop = importlib.import_module("lm_jax.train.loop")
    ppl = importlib.import_module("lm_jax.eval.perplexity")
    assert loop.token_byte_lengths is ppl.token_byte_lengths is token_byte_lengths
    assert lm_jax.eval.token_byte_lengths is token_byte_lengths


def test_a_call_past_the_logits_budget_runs_the_head_in_chunks(monkeypatch):
    """`head_chunk`: the whole head while [rows, T, V] f32 logits fit the budget, else the
    largest power of two of positions that fits; the Scorer's numbers do not change (the
    SmolLM2 hhh_alignment run asked for 39 GB of logits at once before this)."""
    from lm_jax import scoring

    assert scoring.head_chunk(0, 4, 100, 1000, budget=4 * 100 * 1000 * 4) == 0
    assert scoring.head_chunk(0, 4, 100, 1000, budget=4 * 1000 * 4 * 9) == 8
    assert scoring.head_chunk(0, 4, 100, 1000, budget=1) == 1
    assert scoring.head_chunk(16, 4, 100, 1000, budget=1) == 16  # an explicit chunk stands
    cfg, b = UNTIED, _batch()
    params = _params(cfg)
    tok, sums, _ = _reference(cfg, params, b)
    whole = Scorer(cfg, params).score(b)
    monkeypatch.setattr(scoring, "LOGITS_BUDGET_BYTES", 5 * 61 * 4 * 4)  # 4 positions a call
    assert scoring.head_chunk(0, 5, 12, 61) == 4
    chunked = Scorer(cfg, params).score(b)
    np.testing.assert_allclose(chunked.sums, sums, atol=1e-4)
    np.testing.assert_allclose(chunked.sums, whole.sums, atol=2e-5)
