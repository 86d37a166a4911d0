"""T5 against transformers' T5ForConditionalGeneration on random models of unusual sizes
(v1.0: ReLU, scaled tied head; v1.1: gated GELU, unscaled): encoder states and decoder
logits within 1e-4 on padded sources long enough for the log-spaced position buckets; the
bucket function itself; to_hf round trips; cached decoding equals the full forward pass; greedy
decoding equals HF `generate`; beam search with 4 beams gives HF `generate(num_beams=4)`'s ids
and scores (length penalties 1, 0, -1; early stopping on and off), and 1 beam is greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lm_jax.convert import hf_t5
from lm_jax.nn.t5 import T5, relative_position_bucket

SIZES = dict(vocab_size=61, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3,
             num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
             dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
             eos_token_id=1)  # fmt: skip


def hf_model(ff: str, tie: bool, seed: int = 0, init: float = 1.0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(feed_forward_proj=ff, tie_word_embeddings=tie,
                                initializer_factor=init, **SIZES)  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg).eval()


def batch(seed=0, B=3, S=30, T=25):
    rng = np.random.default_rng(seed)
    src = rng.integers(2, SIZES["vocab_size"], (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, 22:] = 0  # padded rows
    mask[2, 9:] = 0
    src = np.where(mask == 1, src, 0)
    tgt = rng.integers(2, SIZES["vocab_size"], (B, T))
    tgt[:, 0] = 0  # the decoder start token
    return src, mask, tgt


VARIANTS = [("relu", True), ("gated-gelu", False)]


def test_relative_position_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-200, 201)[None, :] - np.arange(0, 1)[:, None]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20), (6, 7)):
            ref = T5Attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md
            ).numpy()
            got = relative_position_bucket(jnp.asarray(rel), bidirectional, nb, md)
            np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("ff,tie", VARIANTS)
def test_encoder_states_and_logits_equal_transformers(ff, tie):
    hf = hf_model(ff, tie)
    cfg, params = hf_t5.from_hf(hf)
    assert cfg.model.gated_mlp == (ff == "gated-gelu") and cfg.scale_decoder_outputs == tie
    src, mask, tgt = batch()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(tgt))  # fmt: skip
        enc_ref = hf.encoder(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask))[0]
    model = T5(cfg)
    enc = model.apply({"params": params}, src, mask, method=T5.encode)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(enc)[real], enc_ref.numpy()[real], rtol=1e-4, atol=1e-4)
    logits = model.apply({"params": params}, src, tgt, mask)
    ref = out.logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("ff,tie", VARIANTS)
def test_to_hf_round_trips(ff, tie, tmp_path):
    hf = hf_model(ff, tie, seed=1)
    cfg, params = hf_t5.from_hf(hf)
    hf_t5.to_hf(cfg, params, str(tmp_path))
    back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    src, mask, tgt = batch(1)
    args = dict(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask),
                decoder_input_ids=torch.tensor(tgt))  # fmt: skip
    with torch.no_grad():
        np.testing.assert_allclose(back(**args).logits.numpy(), hf(**args).logits.numpy(),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
    cfg2, params2 = hf_t5.from_hf(str(tmp_path))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def _greedy(cfg, params, src, mask, steps):
    """Greedy ids [B, steps] through the cache (cross keys / values from the first step)."""
    model = T5(cfg)
    enc = model.apply({"params": params}, src, mask, method=T5.encode)
    cache = model.init_cache(src.shape[0], src.shape[1])
    tok = jnp.full((src.shape[0], 1), cfg.decoder_start_token_id, jnp.int32)
    out, all_logits = [], []
    for i in range(steps):
        logits, cache = model.apply({"params": params}, tok, cache, mask, enc if i == 0 else None,
                                    method=T5.decode_step)  # fmt: skip
        all_logits.append(logits)
        tok = jnp.argmax(logits, -1)[:, None].astype(jnp.int32)
        out.append(tok[:, 0])
    return np.stack(out, 1), np.stack(all_logits, 1), enc


@pytest.mark.parametrize("ff,tie", VARIANTS)
def test_cached_decoding_equals_the_full_forward_and_hf_greedy(ff, tie):
    hf = hf_model(ff, tie, seed=2)
    cfg, params = hf_t5.from_hf(hf)
    src, mask, _ = batch(2)
    steps = 12
    ids, step_logits, enc = _greedy(cfg, params, src, mask, steps)
    tgt_in = np.concatenate([np.zeros((src.shape[0], 1), np.int64), ids[:, :-1]], 1)
    full = T5(cfg).apply({"params": params}, tgt_in, enc, mask, method=T5.decode)
    np.testing.assert_allclose(
        step_logits, np.asarray(full), rtol=1e-5, atol=1e-5 * np.abs(full).max()
    )
    # use_cache=False: transformers 5.25's generate sizes its cache by num_layers and fails when
    # the decoder is deeper than the encoder (3 vs 2 here); without it the result is the same.
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask),
                          max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          num_beams=1, use_cache=False)  # fmt: skip
    np.testing.assert_array_equal(ids, ref.numpy()[:, 1:])


@pytest.mark.parametrize(
    "ff,tie,init,length_penalty,early_stopping,mixed",
    [("relu", True, 1.0, 1.0, False, False), ("relu", True, 1.0, 0.0, False, True),
     ("relu", True, 1.0, 0.0, True, True), ("gated-gelu", False, 0.5, -1.0, False, False)],
)  # fmt: skip
def test_beam_search_equals_hf_generate_num_beams_4(ff, tie, init, length_penalty,
                                                    early_stopping, mixed):  # fmt: skip
    from lm_jax.beam_search import seq2seq_beam_search

    hf = hf_model(ff, tie, seed=3, init=init)
    with torch.no_grad():  # a larger EOS row: EOS likely in some contexts, unlikely in others
        hf.shared.weight[1] *= 3.0
    cfg, params = hf_t5.from_hf(hf)
    src, mask, _ = batch(3, B=4)
    steps = 9
    got = seq2seq_beam_search(cfg, params, src, steps, num_beams=4, length_penalty=length_penalty,
                              early_stopping=early_stopping, source_mask=mask)  # fmt: skip
    lengths = np.asarray(got.lengths)
    if mixed:  # some hypotheses end in EOS, others run to max_new_tokens
        assert np.asarray(got.finished).any() and not np.asarray(got.finished).all(), lengths
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask),
                          max_new_tokens=steps, num_beams=4, do_sample=False, eos_token_id=1,
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          use_cache=False, return_dict_in_generate=True,
                          output_scores=True)  # fmt: skip
    ids = ref.sequences.numpy()[:, 1:]  # without the decoder start token
    # HF fills past a hypothesis with `pad_token_id or eos` (a pad id of 0 reads as unset):
    # compare each hypothesis up to and including its EOS, and the lengths
    hf_len = [int(np.argmax(r == 1)) + 1 if (r == 1).any() else len(r) for r in ids]
    assert lengths.tolist() == hf_len
    toks = np.asarray(got.tokens)
    for b, n in enumerate(hf_len):
        np.testing.assert_array_equal(toks[b, :n], ids[b, :n])
        assert (toks[b, n:] == cfg.pad_token_id).all()
    np.testing.assert_allclose(np.asarray(got.scores), ref.sequences_scores.numpy(), rtol=1e-4,
                               atol=1e-6)  # fmt: skip
    greedy = seq2seq_beam_search(cfg, params, src, steps, num_beams=1, source_mask=mask,
                                 stop_tokens=())  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(greedy.tokens), _greedy(cfg, params, src, mask, steps)[0]
    )


def test_a_config_that_is_no_t5_is_a_config_error():
    from lm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lacks d_kv, d_ff"):
        hf_t5.config_from_hf({"vocab_size": 10, "d_model": 8, "num_layers": 1, "num_heads": 2})
    with pytest.raises(ConfigError, match=r"feed_forward_proj 'gated-silu' is not supported"):
        hf_t5.config_from_hf({**SIZES, "d_ff": 8, "feed_forward_proj": "gated-silu"})
