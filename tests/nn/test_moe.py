"""MoE block: HF Mixtral parity, capacity vs dropless, hand-computed drops, expert parallelism,
routing invariants, configuration errors, and MoE inside the Transformer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import ConfigError, MoEConfig, llama_style
from lm_jax.convert import from_hf
from lm_jax.nn import Transformer, init_cache
from lm_jax.nn.mlp import ACTIVATIONS, MLP
from lm_jax.nn.moe import (
    MoE,
    block_layout,
    capacity,
    capacity_ffn,
    capacity_masks,
    check_moe_mesh,
    combine_tokens,
    dispatch_tokens,
    expert_choice_masks,
    expert_ffn,
    grouped_matmul_impl,
    load_balance_loss,
    sorted_ffn,
    token_choice,
    uses_fast_layout,
)
from lm_jax.sharding import make_mesh


def _cfg(**moe):
    moe = {"num_experts": 8, "top_k": 2, **moe}
    return llama_style(d_model=16, mlp_dim=24, num_layers=2, moe=MoEConfig(**moe))


def _init(cfg, shape=(4, 8), seed=0, std=1.0):
    """Random MoE params with O(1) weights (so routing and outputs are far from ties) and x."""
    x = jax.random.normal(jax.random.key(seed), (*shape, cfg.d_model))
    params = nn.unbox(MoE(cfg).init(jax.random.key(1), x)["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    scaled = [
        std * jax.random.normal(k, p.shape) / np.sqrt(p.shape[-2]) for k, p in zip(keys, leaves)
    ]
    return jax.tree.unflatten(tree, scaled), x


def _apply(cfg, params, x, **kw):
    return MoE(cfg, **kw).apply({"params": params}, x, mutable=["aux"])


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# --------------------------------------------------------------------------- HF Mixtral


def test_mixtral_matches_hf_logits():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        sliding_window=None,
        tie_word_embeddings=False,
        initializer_range=0.2,  # O(1) logits and well-separated router scores
    )
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval().float()
    cfg, params = from_hf(hf)
    assert (cfg.d_model, cfg.num_layers, cfg.kv_heads, cfg.tie_embeddings) == (32, 2, 2, False)
    assert cfg.moe == MoEConfig(
        num_experts=4,
        top_k=2,
        dispatch="dropless",
        expert_mlp_dim=48,
        load_balance_coef=hf_cfg.router_aux_loss_coef,
        router_z_coef=0.0,
    )
    tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = Transformer(cfg).apply({"params": params}, jnp.asarray(tokens))
    assert np.abs(ref).max() > 1.0  # not a vacuous comparison of near-zero logits
    assert float(np.abs(np.asarray(ours) - ref).max()) <= 1e-4


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_capacity_without_drops_equals_dropless(router):
    cfg = _cfg(router=router)
    params, x = _init(cfg)
    y_drop, _ = _apply(cfg, params, x)
    # capacity_factor = E / K gives C = S: no expert can overflow
    cap_cfg = _cfg(router=router, dispatch="capacity", capacity_factor_eval=4.0)
    y_cap, aux = _apply(cap_cfg, params, x)
    assert float(aux["aux"]["moe_metrics"][0]["dropped_fraction"]) == 0.0
    assert _max_diff(y_cap, y_drop) <= 1e-5


def test_auto_grouped_matmul_is_block_padded_on_cpu():
    assert jax.default_backend() == "cpu"
    assert grouped_matmul_impl("auto") == "block_padded"
    assert grouped_matmul_impl("ragged_dot") == "ragged_dot"


def test_block_layout_pads_each_expert_to_whole_blocks():
    # experts 0..3, block 4: sizes [5, 0, 2, 1] -> padded [8, 0, 4, 4]; id 4 = skip
    ids = jnp.array([2, 0, 0, 4, 3, 0, 0, 2, 0])
    dest, block_expert, R, fast = block_layout(ids, 4, 4)
    assert R == 4 * -(-(9 + 4 * 3) // 4)  # worst case M + E * (block - 1), whole blocks
    assert dest.tolist() == [8, 0, 1, R, 12, 2, 3, 9, 4]  # each group in row order; skip -> R
    assert block_expert.tolist()[:4] == [0, 0, 2, 3]  # blocks past the last group: unused
    assert not bool(fast)
    # fast path: 6 blocks rounded up to 8 (a multiple of E), R = 32; every expert fits R / E = 8
    # rows, so expert e owns rows [8e, 8e + 8) and blocks 2e, 2e + 1
    dest, block_expert, R, fast = block_layout(ids, 4, 4, fast_path=True)
    assert R == 32 and bool(fast)
    assert dest.tolist() == [16, 0, 1, R, 24, 2, 3, 17, 4]
    assert block_expert.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # 9 rows of expert 0 do not fit 8 slots: the padded layout, as without the fast path
    heavy = jnp.zeros((9,), jnp.int32)
    dest, block_expert, R, fast = block_layout(heavy, 4, 4, fast_path=True)
    assert (
        not bool(fast) and dest.tolist() == list(range(9)) and block_expert.tolist()[:3] == [0] * 3
    )


@pytest.mark.parametrize("block", [1, 4, 64])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_block_padded_equals_ragged_dot(block, activation):
    """Forward and gradients, skewed routing (one expert gets a third of the rows, one none)
    and skipped rows (id == E, as the expert-parallel path sends)."""
    M, E, D, F = 61, 8, 16, 24
    k = jax.random.split(jax.random.key(block), 5)
    x = jax.random.normal(k[0], (M, D))
    ids = jax.random.randint(k[1], (M,), 0, E + 1)  # E = skip
    ids = jnp.where(ids == 5, 6, ids).at[: M // 3].set(1)  # expert 5 empty, expert 1 heavy
    names = ("gate", "up", "down") if activation == "silu" else ("up", "down")
    kernels = {
        n: jax.random.normal(kk, (E, F, D) if n == "down" else (E, D, F)) / 4
        for n, kk in zip(names, k[2:])
    }
    act = ACTIVATIONS[activation]

    def loss(impl):
        def f(x, kernels):
            y = sorted_ffn(x, ids, E, kernels, act, impl=impl, block=block)
            return jnp.sum(y * jnp.cos(x)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, kernels)

    (l1, y1), g1 = loss("ragged_dot")
    (l2, y2), g2 = loss("block_padded")
    assert float(jnp.abs(y1).max()) > 0.5
    assert bool((y2[ids == E] == 0).all())
    assert _max_diff(y1, y2) <= 1e-5
    assert _max_diff(g1, g2) <= 1e-5


def test_moe_block_padded_equals_ragged_dot_with_grads():
    cfg_r = _cfg(grouped_matmul="ragged_dot")
    cfg_b = _cfg(grouped_matmul="block_padded", grouped_matmul_block=4)
    params, x = _init(cfg_r)

    def loss(cfg):
        def f(p, x):
            y, aux = _apply(cfg, p, x)
            return jnp.sum(y * jnp.cos(x)) + aux["aux"]["moe_loss"][0], y

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)

    (l1, y1), g1 = loss(cfg_r)
    (l2, y2), g2 = loss(cfg_b)
    assert _max_diff(y1, y2) <= 1e-5
    assert _max_diff(g1, g2) <= 1e-5


def test_capacity_drop_counts_hand_computed():
    # top-1, 64 tokens, 8 experts, all routed to expert 3: C = ceil(1.25 * 64 * 1 / 8) = 10
    assert capacity(1.25, 64, 1, 8) == 10
    ids = jnp.full((1, 64, 1), 3)
    dispatch, combine = capacity_masks(ids, jnp.ones((1, 64, 1)), 8, 10)  # [G, S, E, C]
    kept = dispatch.sum(axis=(2, 3))[0]  # [S]
    assert int(64 - kept.sum()) == 54
    np.testing.assert_array_equal(kept, [1] * 10 + [0] * 54)  # by position
    np.testing.assert_array_equal(dispatch[0, :10, 3].argmax(-1), np.arange(10))  # slots 0..9

    # the same through the module: a router that sends every token to expert 3
    cfg = _cfg(top_k=1, dispatch="capacity", capacity_factor_train=1.25, capacity_factor_eval=2.0)
    params, _ = _init(cfg)
    x = jnp.abs(jax.random.normal(jax.random.key(5), (1, 64, 16))) + 0.1
    params["router"]["kernel"] = jnp.zeros((16, 8)).at[:, 3].set(1.0)
    _, aux = _apply(cfg, params, x, deterministic=False)  # train factor 1.25
    assert float(aux["aux"]["moe_metrics"][0]["dropped_fraction"]) == pytest.approx(54 / 64)
    _, aux = _apply(cfg, params, x)  # eval factor 2.0: C = 16
    assert float(aux["aux"]["moe_metrics"][0]["dropped_fraction"]) == pytest.approx(48 / 64)


@pytest.mark.parametrize("factor", [0.5, 1.0, 4.0])  # heavy drops, some drops, none
def test_capacity_by_index_equals_one_hot_dispatch_and_combine(factor):
    cfg = _cfg(dispatch="capacity")
    params, x = _init(cfg)
    logits = jnp.einsum("btd,de->bte", x, params["router"]["kernel"])
    weights, ids = token_choice(logits, 2, "softmax_topk")
    kernels = {k.split("_")[0]: v["kernel"] for k, v in params["experts"].items()}
    act, cap = ACTIVATIONS[cfg.activation], capacity(factor, 8, 2, 8)

    def by_index(x, kernels):
        return capacity_ffn(x, ids, weights, kernels, act, 8, cap)[0]

    def by_one_hot(x, kernels):
        dispatch, combine = capacity_masks(ids, weights, 8, cap)
        h = dispatch_tokens(x, dispatch)  # [E, G, C, D]
        h = expert_ffn(h.reshape(8, -1, x.shape[-1]), kernels, act).reshape(h.shape)
        return combine_tokens(h, combine)

    np.testing.assert_allclose(by_index(x, kernels), by_one_hot(x, kernels), atol=1e-5)
    grad = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), (0, 1))(x, kernels)  # noqa: E731
    got, want = jax.tree.leaves(grad(by_index)), jax.tree.leaves(grad(by_one_hot))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    kept = capacity_ffn(x, ids, weights, kernels, act, 8, cap)[1]
    assert int(kept.sum()) == int(capacity_masks(ids, weights, 8, cap)[0].sum())


def test_top1_choices_have_priority_over_top2():
    # 3 tokens, 2 experts, top-2, C = 2. 1st choices: e0, e0, e1; 2nd choices: e1, e1, e0.
    ids = jnp.array([[[0, 1], [0, 1], [1, 0]]])
    dispatch, _ = capacity_masks(ids, jnp.full((1, 3, 2), 0.5), 2, 2)
    # e0: 1st choices of tokens 0, 1 fill it -> token 2's 2nd choice is dropped.
    # e1: token 2's 1st choice comes before token 0's 2nd choice -> token 1's 2nd is dropped.
    np.testing.assert_array_equal(dispatch[0].sum(-1), [[1, 1], [1, 0], [0, 1]])


def test_combine_weights_of_kept_tokens_sum_to_one():
    cfg = _cfg()
    params, x = _init(cfg)
    logits = jnp.einsum("btd,de->bte", x, params["router"]["kernel"])
    weights, ids = token_choice(logits, 2, "softmax_topk")
    dispatch, combine = capacity_masks(ids, weights, 8, capacity(1.0, 8, 2, 8))
    kept = dispatch.sum(axis=(2, 3)) == 2  # every choice of the token kept
    assert 0 < int(kept.sum()) < kept.size  # some tokens lose a choice at this capacity
    np.testing.assert_allclose(combine.sum(axis=(2, 3))[kept], 1.0, atol=1e-6)


def test_expert_choice_each_expert_takes_exactly_capacity_tokens():
    cfg = _cfg(router="expert_choice", dispatch="capacity", capacity_factor_eval=1.0)
    params, x = _init(cfg)
    C = capacity(1.0, 8, 2, 8)
    probs = jax.nn.softmax(jnp.einsum("btd,de->bte", x, params["router"]["kernel"]))
    dispatch, combine = expert_choice_masks(probs, C)  # [G, S, E, C]
    np.testing.assert_array_equal(dispatch.sum(axis=(1, 3)), C)  # per group and expert
    np.testing.assert_array_equal(dispatch.sum(axis=1), 1)  # each slot holds one token
    y, aux = _apply(cfg, params, x)
    assert y.shape == x.shape and bool(jnp.isfinite(y).all())
    np.testing.assert_allclose(aux["aux"]["moe_metrics"][0]["load"], 1 / 8, atol=1e-6)


def test_shared_experts_add_a_dense_path():
    cfg = _cfg(num_shared_experts=2)
    params, x = _init(cfg)
    y, _ = _apply(cfg, params, x)
    routed = {k: v for k, v in params.items() if k != "shared_experts"}
    y_routed, _ = _apply(_cfg(), routed, x)
    dense = MLP(cfg, 2 * 24).apply({"params": params["shared_experts"]}, x)
    assert params["shared_experts"]["up_proj"]["kernel"].shape == (16, 48)
    np.testing.assert_allclose(y, y_routed + dense, atol=1e-5)


def test_jitter_uses_dropout_rng_only_in_training():
    cfg = _cfg(jitter_noise=0.1)
    params, x = _init(cfg)
    y0, _ = _apply(cfg, params, x)  # deterministic: no rng needed
    y1, _ = MoE(cfg, deterministic=False).apply(
        {"params": params}, x, rngs={"dropout": jax.random.key(0)}, mutable=["aux"]
    )
    assert y0.shape == y1.shape and not np.allclose(y0, y1)


# --------------------------------------------------------------------------- losses, NaN, errors


def test_load_balance_loss_at_balanced_load():
    cfg = _cfg()
    params, x = _init(cfg)
    params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])

    def loss(p):
        _, aux = _apply(cfg, p, x)
        return aux["aux"]["moe_loss"][0], aux["aux"]["moe_metrics"][0]

    (val, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert float(metrics["load_balance_loss"]) == pytest.approx(1.0)  # uniform P: E * 1/E
    assert float(metrics["load_balance_loss"]) >= 0 and float(val) >= 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (64, 8)))
    load = jnp.bincount(jnp.argmax(probs, -1), length=8) / 64
    assert float(load_balance_loss(probs, load)) >= 0


def test_nan_router_logit_is_an_error():
    cfg = _cfg()
    params, x = _init(cfg)
    x = x.at[1, 3, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="NaN"):
        _apply(cfg, params, x)  # eager: concrete logits
    # under jit: the token's output and the losses are NaN (never routed silently)
    y, aux = jax.jit(lambda p, x: _apply(cfg, p, x))(params, x)
    assert bool(jnp.isnan(y[1, 3]).all()) and bool(jnp.isfinite(y[0]).all())
    assert bool(jnp.isnan(aux["aux"]["moe_loss"][0]))


def test_bad_configs_raise_before_compiling():
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(capacity_factor_train=0.0)
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(capacity_factor_eval=-1.0)
    with pytest.raises(ConfigError, match="dispatch='capacity'"):
        MoEConfig(router="expert_choice")
    with pytest.raises(ConfigError, match="every"):
        llama_style(num_layers=3, moe=MoEConfig(every=2))
    with pytest.raises(ConfigError, match="grouped_matmul"):
        MoEConfig(grouped_matmul="cutlass")
    with pytest.raises(ConfigError, match="grouped_matmul_block"):
        MoEConfig(grouped_matmul_block=0)
    cfg = llama_style(d_model=16, num_layers=2, moe=MoEConfig(num_experts=6))
    mesh = make_mesh("expert:4,data:2")
    with pytest.raises(ConfigError, match="divisible by the mesh's expert axis"):
        check_moe_mesh(cfg, mesh)
    check_moe_mesh(_cfg(), mesh)  # 8 experts over 4: fine
    # the module checks it too, while tracing (before XLA compiles anything)
    x = jnp.zeros((8, 4, 16))
    with jax.set_mesh(mesh), pytest.raises(ConfigError, match="num_experts"):
        jax.jit(lambda x: MoE(cfg).init(jax.random.key(0), x)).lower(x)


# --------------------------------------------------------------------------- expert parallelism


@pytest.mark.parametrize("dispatch", ["dropless:ragged_dot", "dropless:block_padded", "capacity"])
@pytest.mark.parametrize("spec", ["expert:4,data:2", "expert:8", "expert:2,fsdp:2,tensor:2"])
def test_expert_parallel_equals_single_device(spec, dispatch):
    dispatch, _, gmm = dispatch.partition(":")
    cfg = _cfg(  # capacity: some tokens dropped
        dispatch=dispatch, capacity_factor_eval=1.0, grouped_matmul=gmm or "auto"
    )
    params, x = _init(cfg, shape=(8, 6))

    def loss(p, x):
        y, aux = _apply(cfg, p, x)
        return jnp.sum(y * jnp.cos(x)) + aux["aux"]["moe_loss"][0], y

    (l1, y1), g1 = jax.value_and_grad(loss, has_aux=True)(params, x)
    mesh = make_mesh(spec)
    with jax.set_mesh(mesh):
        f = jax.jit(jax.value_and_grad(loss, has_aux=True))
        assert "all_to_all" in str(jax.make_jaxpr(f)(params, x))  # tokens are exchanged
        (l2, y2), g2 = f(params, x)
    assert _max_diff(y1, y2) <= 1e-5
    assert _max_diff(g1, g2) <= 1e-5
    assert abs(float(l1 - l2)) <= 1e-4 * max(1.0, abs(float(l1)))
    if spec == "expert:8":  # batch 1 cannot be split: local experts on replicated tokens
        with jax.set_mesh(mesh):
            y3 = jax.jit(lambda p, x: _apply(cfg, p, x)[0])(params, x[:1])
        assert _max_diff(_apply(cfg, params, x[:1])[0], y3) <= 1e-5


# --------------------------------------------------------------------------- inside the Transformer


@pytest.mark.parametrize("every", [1, 2])
def test_transformer_with_moe(every):
    cfg = llama_style(
        vocab_size=61,
        d_model=16,
        num_heads=2,
        num_layers=2,
        mlp_dim=24,
        max_len=32,
        moe=MoEConfig(num_experts=4, top_k=2, every=every),
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    mlp = params["layers"]["mlp"] if every == 1 else params["layers"]["block_1"]["mlp"]
    assert mlp["experts"]["gate_proj"]["kernel"].shape == (2 // every, 4, 16, 24)
    if every == 2:
        assert params["layers"]["block_0"]["mlp"]["up_proj"]["kernel"].shape == (1, 16, 24)

    full = model.apply({"params": params}, tokens)
    cache = init_cache(cfg, 2, 16)
    logits, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
    outs = [logits]
    for t in range(5, 12):
        pos = jnp.full((2, 1), t)
        logits, cache = model.apply({"params": params}, tokens[:, t : t + 1], pos, cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=0)

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens, mutable=["aux"])
        moe = sum(
            jnp.sum(v)
            for path, v in jax.tree_util.tree_leaves_with_path(aux["aux"])
            if "moe_loss" in jax.tree_util.keystr(path)
        )
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + moe, moe

    (val, moe), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert float(moe) > 0 and bool(jnp.isfinite(val))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_block_padded_fast_path_equals_ragged_dot_both_branches(skewed, activation):
    """block_padded with its fixed-layout fast path (custom VJP, lax.cond) equals ragged_dot in
    forward and gradients, both when the loads fit R / E rows (balanced: the fixed layout runs)
    and when they do not (one expert gets half the rows: the gathered layout runs); skipped rows
    (id == E) output 0; the fast path off gives the same."""
    M, E, D, F = 96, 8, 16, 24
    k = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(k[0], (M, D))
    ids = jnp.arange(M) % (E + 1)  # balanced, ~M/(E+1) rows per expert and skips
    if skewed:
        ids = ids.at[: M // 2].set(3)
    assert bool(uses_fast_layout(ids, E, 4)) is (not skewed)
    names = ("gate", "up", "down") if activation == "silu" else ("up", "down")
    kernels = {
        n: jax.random.normal(kk, (E, F, D) if n == "down" else (E, D, F)) / 4
        for n, kk in zip(names, k[2:])
    }
    act = ACTIVATIONS[activation]

    def run(**gmm):
        def f(x, kernels):
            y = sorted_ffn(x, ids, E, kernels, act, **gmm)
            return jnp.sum(y * jnp.cos(x)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, kernels)

    (_, y1), g1 = run(impl="ragged_dot")
    (_, y2), g2 = run(impl="block_padded", block=4)
    (_, y3), g3 = run(impl="block_padded", block=4, fast_path=False)
    assert float(jnp.abs(y1).max()) > 0.5
    assert bool((y2[ids == E] == 0).all())
    assert _max_diff(y1, y2) <= 1e-5 and _max_diff(g1, g2) <= 1e-5
    assert _max_diff(y1, y3) <= 1e-5 and _max_diff(g1, g3) <= 1e-5


def test_moe_reports_dropless_fast_path():
    """Balanced routing (a zero router: every token ties, top-k takes experts 0..K-1, so K of E
    experts get every token: too many for R / E rows) -> 0; random O(1) routing -> a fraction."""
    cfg = _cfg(grouped_matmul="block_padded", grouped_matmul_block=4)
    params, x = _init(cfg)
    _, aux = _apply(cfg, params, x)
    frac = float(aux["aux"]["moe_metrics"][0]["dropless_fast_path"])
    assert frac in (0.0, 1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    _, aux = _apply(cfg, zero, x)
    assert float(aux["aux"]["moe_metrics"][0]["dropless_fast_path"]) == 0.0
    off = _cfg(grouped_matmul="block_padded", dropless_fast_path=False)
    _, aux = _apply(off, params, x)
    assert "dropless_fast_path" not in aux["aux"]["moe_metrics"][0]
