"""Beam search (lm_jax/beam_search.py) against HF transformers' `generate(num_beams=...)` on a
random Llama of unusual size: the same token ids and sequence scores for length penalties
0.5 / 1 / 2 and early_stopping False / True / "never"; beam 1 equals greedy `generate`."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_jax.beam_search import beam_search  # noqa: E402
from lm_jax.convert import from_hf  # noqa: E402
from lm_jax.generate import generate  # noqa: E402

V, EOS = 24, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    c = transformers.LlamaConfig(
        vocab_size=V, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=96,
        initializer_range=0.3, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    )  # fmt: skip
    c._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(c).eval().float()
    cfg, params = from_hf(hf)
    return hf, cfg, params


PROMPTS = np.random.default_rng(1).integers(4, V, (3, 7)).astype(np.int32)


def hf_beams(hf, prompts, n, **kw):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(prompts, dtype=torch.long), attention_mask=torch.ones(prompts.shape),
            max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=0, eos_token_id=EOS, **kw,
        )  # fmt: skip
    return out.sequences[:, prompts.shape[1] :].numpy(), out.sequences_scores.numpy()


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping,n",
    [(4, 1.0, False, 12), (4, 0.5, True, 12), (3, 2.0, "never", 12), (5, 1.0, True, 12),
     (2, -0.5, False, 12), (4, 1.0, False, 4), (3, 2.0, "never", 5)],
)  # fmt: skip
def test_same_ids_and_scores_as_transformers(model, num_beams, length_penalty, early_stopping, n):
    hf, cfg, params = model
    want, want_scores = hf_beams(
        hf, PROMPTS, n, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping,
    )  # fmt: skip
    got = beam_search(
        cfg, params, PROMPTS, n, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, stop_tokens=(EOS,), pad_id=0,
    )  # fmt: skip
    toks, lens = np.asarray(got.tokens), np.asarray(got.lengths)
    ended = 0
    for b in range(len(PROMPTS)):
        ref = want[b]
        ref = ref[: np.flatnonzero(ref == EOS)[0] + 1] if EOS in ref else ref[:n]
        assert toks[b, : lens[b]].tolist() == ref.tolist(), (b, toks[b], want[b])
        assert (toks[b, lens[b] :] == 0).all()
        ended += bool(got.finished[b])
        assert bool(got.finished[b]) == (ref[-1] == EOS)
    np.testing.assert_allclose(np.asarray(got.scores), want_scores, atol=1e-4, rtol=1e-4)
    print(f"beams {num_beams}: {ended}/{len(PROMPTS)} hypotheses end in EOS")


def test_the_cases_cover_eos_and_max_length_endings(model):
    _, cfg, params = model
    long = beam_search(cfg, params, PROMPTS, 12, num_beams=4, stop_tokens=(EOS,))
    short = beam_search(cfg, params, PROMPTS, 4, num_beams=4, stop_tokens=(EOS,))
    assert np.asarray(long.finished).all() and not np.asarray(short.finished).all()


def test_one_beam_is_greedy_generate_on_ragged_prompts(model):
    _, cfg, params = model
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    got = beam_search(cfg, params, prompts, 10, num_beams=1, stop_tokens=(EOS,), pad_id=0)
    ref = generate(cfg, params, prompts, jax.random.key(0), 10, temperature=0.0,
                   stop_tokens=(EOS,), pad_id=0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(ref.lengths))


def test_bad_settings_are_clear_errors(model):
    _, cfg, params = model
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        beam_search(cfg, params, PROMPTS, 4, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping must be"):
        beam_search(cfg, params, PROMPTS, 4, early_stopping="sometimes")
    with pytest.raises(ValueError, match="lower num_beams"):
        beam_search(cfg, params, PROMPTS, 4, num_beams=13)


def test_generate_binary_decodes_with_beams_when_asked(model, load_binary):
    """experiments/generate.py --num_beams=3 --length_penalty=0.5 prints beam_search's tokens."""
    _, cfg, params = model
    argv = ["--num_beams=3", "--length_penalty=0.5", "--max_new_tokens=9"]
    binary = load_binary("experiments/generate.py", argv)
    ids = PROMPTS[0].tolist()
    tokens, line = binary.decode(cfg, params, ids, (EOS,), 0)
    ref = beam_search(cfg, params, [ids], 9, num_beams=3, length_penalty=0.5,
                      stop_tokens=(EOS,))  # fmt: skip
    n = int(ref.lengths[0])
    assert tokens.tolist() == np.asarray(ref.tokens[0, :n]).tolist()
    assert "3 beams" in line and f"{float(ref.scores[0]):.3f}" in line
