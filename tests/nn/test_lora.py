"""LoRA: exact at init, frozen base under training, merge/unmerge, adapter checkpoints, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm_jax import adapters as L
from lm_jax.adapters.tree import _key
from lm_jax.configs import ConfigError, ModelConfig, gpt2_style, llama_style
from lm_jax.nn import Transformer

LORA = L.LoraConfig(rank=4, alpha=8.0)
CONFIGS = {
    "gpt2": gpt2_style(vocab_size=97, d_model=32, num_heads=4, num_layers=2, max_len=32, lora=LORA),
    "llama": llama_style(
        vocab_size=97,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        num_layers=2,
        max_len=32,
        mlp_dim=48,
        tie_embeddings=False,
        lora=L.LoraConfig(rank=4, alpha=8.0, rslora=True, targets=(r"q_proj$", r"mlp/")),
    ),
}


def _tokens(cfg, B=2, T=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


def _init(cfg, seed=1):
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), _tokens(cfg))["params"])


def _randomise_b(params, seed=7, std=0.05):
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        std * jax.random.normal(k, x.shape, x.dtype) if _key(p[-1]) == "lora_b" else x
        for k, (p, x) in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, out)


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_init_equals_base_model_to_the_bit(name):
    cfg = CONFIGS[name]
    params = _init(cfg)
    base, adapters = L.split_lora(params)
    assert adapters and set(L.check_targets(cfg, params)) == {
        "/".join(p) for p in _adapter_modules(adapters)
    }
    # The base part is what the plain model initialises (adding LoRA changes no other init).
    plain = _init(cfg.replace(lora=None))
    assert jax.tree.structure(plain) == jax.tree.structure(base)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(base), strict=True)
    )
    tokens = _tokens(cfg)
    with_lora = Transformer(cfg).apply({"params": params}, tokens)
    without = Transformer(cfg.replace(lora=None)).apply({"params": base}, tokens)
    assert np.array_equal(np.asarray(with_lora), np.asarray(without))
    # Stacked over the scanned L axis, logical names follow the kernel.
    boxed = Transformer(cfg).init(jax.random.key(1), tokens)["params"]
    q = boxed["layers"]["attn"]["q_proj"]
    assert q["lora_a"].names == ("layers", "embed", "lora_rank")
    assert q["lora_b"].names == ("layers", "lora_rank", "heads")
    assert q["lora_a"].value.shape == (cfg.num_layers, cfg.d_model, cfg.lora.rank)
    assert not np.any(q["lora_b"].value) and np.any(q["lora_a"].value)


def _adapter_modules(adapters):
    return {
        tuple(_key(k) for k in p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)
    }


def _nll(cfg, params, tokens):
    logits = Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_training_moves_adapters_only_and_optimizer_state_is_adapter_sized():
    cfg = CONFIGS["llama"]
    params = _init(cfg)
    tokens = _tokens(cfg, B=4, T=12, seed=3)
    tx = L.lora_optimizer(optax.adam(3e-2), params)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: _nll(cfg, p, tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    p = params
    losses = []
    for _ in range(4):
        p, opt_state, loss = step(p, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    base0, ad0 = L.split_lora(params)
    base1, ad1 = L.split_lora(p)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(base0), jax.tree.leaves(base1), strict=True
    ):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
    assert all(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(ad0), jax.tree.leaves(ad1), strict=True)
    )

    # Adam moments (mu, nu) for the adapter leaves only, plus scalar step counts.
    arrays = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "shape")]
    tensors = [x for x in arrays if x.ndim > 0]
    n_adapters = len(jax.tree.leaves(ad0))
    assert len(tensors) == 2 * n_adapters
    assert L.tree_bytes(tensors) == 2 * L.tree_bytes(ad0)
    assert L.tree_bytes(arrays) - L.tree_bytes(tensors) <= 16  # the count scalars
    assert L.tree_bytes(ad0) < 0.25 * L.tree_bytes(base0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merge_equals_adapters_and_unmerge_restores_base(name):
    cfg = CONFIGS[name]
    params = _randomise_b(_init(cfg))
    tokens = _tokens(cfg)
    adapted = Transformer(cfg).apply({"params": params}, tokens)
    merged = L.merge(params, cfg)
    assert not L.split_lora(merged)[1]
    out = Transformer(cfg.replace(lora=None)).apply({"params": merged}, tokens)
    base, adapters = L.split_lora(params)
    plain = Transformer(cfg.replace(lora=None)).apply({"params": base}, tokens)
    assert float(jnp.max(jnp.abs(plain - adapted))) > 1e-3  # the adapters do something
    merge_diff = float(jnp.max(jnp.abs(out - adapted)))
    assert merge_diff <= 1e-5, merge_diff
    restored = L.unmerge(merged, adapters, cfg)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    unmerge_diff = _max_diff(restored, params)
    assert unmerge_diff <= 1e-6, unmerge_diff


def test_lora_dropout_only_in_training():
    cfg = CONFIGS["gpt2"].replace(lora=L.LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    params = _randomise_b(_init(cfg))
    tokens = _tokens(cfg)
    model = Transformer(cfg)
    rngs = {"dropout": jax.random.key(5)}
    eval_ = model.apply({"params": params}, tokens, rngs=rngs)
    again = model.apply({"params": params}, tokens)
    train = model.apply({"params": params}, tokens, deterministic=False, rngs=rngs)
    assert np.array_equal(eval_, again)
    assert float(jnp.max(jnp.abs(train - eval_))) > 1e-4


def test_adapter_checkpoint_roundtrip_bank_and_bf16_base(tmp_path):
    cfg = CONFIGS["gpt2"]
    p1 = _randomise_b(_init(cfg), seed=1)
    p2 = _randomise_b(_init(cfg), seed=2)
    base, ad1 = L.split_lora(p1)
    _, ad2 = L.split_lora(p2)
    nbytes = L.save_adapters(str(tmp_path / "a1"), ad1, cfg.lora)
    L.save_adapters(str(tmp_path / "a2"), ad2, cfg.lora)
    assert nbytes == L.tree_bytes(ad1)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "a1").rglob("*") if f.is_file())
    assert on_disk < nbytes + 64_000 < L.tree_bytes(base)  # the adapters, not the model

    loaded, lcfg = L.load_adapters(str(tmp_path / "a1"))
    assert lcfg == cfg.lora and _max_diff(loaded, ad1) == 0.0

    bank = L.AdapterBank(base, cfg.replace(lora=None))
    bank.load("one", str(tmp_path / "a1"))
    bank.load("two", str(tmp_path / "a2"))
    tokens = _tokens(cfg)
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    o1 = fwd(bank.params("one"), tokens)
    o2 = fwd(bank.params("two"), tokens)
    assert bank.params("two")["embed_tokens"]["embedding"] is bank.base["embed_tokens"]["embedding"]
    assert fwd._cache_size() == 1  # switching adapters does not recompile
    assert np.array_equal(o1, fwd(p1, tokens))
    assert float(jnp.max(jnp.abs(o1 - o2))) > 1e-4
    assert bank.config("one") == cfg

    # A bf16 frozen base with f32 adapters stays close to the f32 model.
    low = L.cast_base(p1, jnp.bfloat16)
    assert low["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert low["layers"]["attn"]["q_proj"]["lora_a"].dtype == jnp.float32
    out = Transformer(cfg).apply({"params": low}, tokens)
    assert float(jnp.max(jnp.abs(out - o1))) < 0.05


def test_model_config_roundtrip_with_lora():
    cfg = CONFIGS["llama"]
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.lora, L.LoraConfig) and hash(again) == hash(cfg)


def test_bad_configs_fail_at_start_up_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="lora.rank"):
        L.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="lora.alpha"):
        L.LoraConfig(alpha=0.0)
    with pytest.raises(ConfigError, match="lora.alpha"):
        L.LoraConfig(alpha=-1.0)
    with pytest.raises(ConfigError, match="lora.targets"):
        L.LoraConfig(targets="(")

    cfg = CONFIGS["llama"]
    # rank > min(d_in, d_out): at abstract init (before compiling), and in check_targets
    big = cfg.replace(lora=L.LoraConfig(rank=40, targets=r"q_proj$"))
    with pytest.raises(ConfigError, match=r"lora.rank \(40\) exceeds"):
        L.check_targets(big)
    with pytest.raises(ConfigError, match=r"lora.rank \(40\) exceeds.*q_proj"):
        jax.eval_shape(lambda t: Transformer(big).init(jax.random.key(0), t), _tokens(cfg))
    # a pattern that matches no kernel
    typo = cfg.replace(lora=L.LoraConfig(targets=(r"q_proj$", r"attn/qkv$")))
    with pytest.raises(ConfigError, match=r"attn/qkv\$.*matches no kernel"):
        L.check_targets(typo)
    assert set(L.check_targets(cfg)) == {
        "layers/attn/q_proj",
        "layers/mlp/gate_proj",
        "layers/mlp/up_proj",
        "layers/mlp/down_proj",
    }

    # restoring a full model from an adapter-only checkpoint
    params = _init(cfg)
    base, adapters = L.split_lora(params)
    L.save_adapters(str(tmp_path / "ad"), adapters, cfg.lora)
    with pytest.raises(L.AdapterCheckpointError, match="adapter-only checkpoint"):
        L.load_adapters(str(tmp_path / "ad"), target=params)
    with pytest.raises(L.AdapterCheckpointError, match="adapter-only checkpoint"):
        L.restore_full_model_guard(str(tmp_path / "ad"))
    with pytest.raises(ConfigError, match="only LoRA adapters"):
        L.combine(adapters, adapters)
    with pytest.raises(ConfigError, match="only LoRA adapters"):
        L.AdapterBank(adapters)
    with pytest.raises(L.AdapterCheckpointError, match="not an lm_jax adapter checkpoint"):
        L.load_adapters(str(tmp_path))
    # adapters restored onto their own (abstract) target are fine
    again, _ = L.load_adapters(str(tmp_path / "ad"), target=jax.eval_shape(lambda: adapters))
    assert _max_diff(again, adapters) == 0.0


def _moe_cfg(num_experts=4):
    from lm_jax.configs import MoEConfig

    return llama_style(
        vocab_size=61,
        d_model=16,
        num_heads=2,
        num_layers=2,
        max_len=32,
        mlp_dim=32,
        tie_embeddings=False,
        moe=MoEConfig(num_experts=num_experts, top_k=2, dispatch="dropless"),
        lora=L.LoraConfig(rank=2, alpha=4.0),
    )


def test_lora_on_routed_experts_gets_gradients_and_shards_over_experts():
    from lm_jax.sharding import make_mesh, params_shardings

    cfg = _moe_cfg()
    E = cfg.moe.num_experts
    tokens = _tokens(cfg, B=4, T=16, seed=2)
    boxed = Transformer(cfg).init(jax.random.key(1), tokens)["params"]
    params = nn.unbox(boxed)
    targeted = L.check_targets(cfg, params)
    assert {"layers/mlp/experts/up_proj", "layers/mlp/experts/down_proj"} <= set(targeted)
    assert "layers/mlp/router" not in targeted
    exp = boxed["layers"]["mlp"]["experts"]["up_proj"]
    assert exp["lora_a"].names == ("layers", "expert", "embed", "lora_rank")
    assert exp["lora_b"].names == ("layers", "expert", "lora_rank", "mlp")
    assert exp["lora_a"].value.shape == (cfg.num_layers, E, cfg.d_model, 2)
    base, _ = L.split_lora(params)
    at_init = Transformer(cfg).apply({"params": params}, tokens)
    plain = Transformer(cfg.replace(lora=None)).apply({"params": base}, tokens)
    assert np.array_equal(at_init, plain)

    params = _randomise_b(params)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, t: _nll(cfg, p, t)))
    loss, grads = grad_fn(params, tokens)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for leaf in ("lora_a", "lora_b"):
            g = np.asarray(grads["layers"]["mlp"]["experts"][proj][leaf])  # [L, E, ...]
            per_expert = np.abs(g).reshape(cfg.num_layers, E, -1).max(-1)
            assert (per_expert > 0).all(), (proj, leaf, per_expert)
    merged = L.merge(params, cfg)
    out = Transformer(cfg.replace(lora=None)).apply({"params": merged}, tokens)
    assert float(jnp.max(jnp.abs(out - Transformer(cfg).apply({"params": params}, tokens)))) < 1e-5

    mesh = make_mesh("expert:4,data:2")
    shardings = params_shardings(boxed, mesh)
    assert shardings["layers"]["mlp"]["experts"]["up_proj"]["lora_a"].spec[1] == "expert"
    with jax.set_mesh(mesh):
        loss_sh, grads_sh = grad_fn(jax.device_put(params, shardings), tokens)
    assert abs(float(loss_sh) - float(loss)) < 1e-5
    assert _max_diff(L.split_lora(grads_sh)[1], L.split_lora(grads)[1]) < 1e-5


def test_merging_saved_adapters_into_a_loaded_model(tmp_path):
    """`convert.sources.merge_adapters` (evaluate.py --adapters): the plain model it returns
    computes what the model with the adapters computes; a folder without adapters and adapters
    of another model are one-line ConfigErrors."""
    from lm_jax.convert.sources import merge_adapters

    cfg = CONFIGS["llama"]
    tuned = _randomise_b(_init(cfg), seed=3)
    base, ad = L.split_lora(tuned)
    L.save_adapters(str(tmp_path / "run" / "adapters"), ad, cfg.lora)
    plain = cfg.replace(lora=None)
    got_cfg, merged = merge_adapters(plain, base, str(tmp_path / "run"))  # the workdir
    assert got_cfg == plain and not L.split_lora(merged)[1]
    tokens = _tokens(cfg)
    want = Transformer(cfg).apply({"params": tuned}, tokens)
    out = Transformer(plain).apply({"params": merged}, tokens)
    np.testing.assert_allclose(out, want, atol=2e-5)
    assert float(jnp.max(jnp.abs(out - Transformer(plain).apply({"params": base}, tokens)))) > 1e-3
    with pytest.raises(ConfigError, match="holds no LoRA adapters"):
        merge_adapters(plain, base, str(tmp_path))
    other = CONFIGS["gpt2"]
    with pytest.raises(ConfigError, match="adapter|fit this model"):
        merge_adapters(other.replace(lora=None), L.split_lora(_init(other))[0],
                       str(tmp_path / "run"))  # fmt: skip
