"""Per-request LoRA adapters: rows of one batch, each with its own adapter (different ranks,
targets and rsLoRA scaling) or none, give the logits of the model with that adapter merged
(`lm_jax.adapters.merge`, the peft-checked maths); in the continuous-batching engine, requests on
different adapters in one running batch each equal `generate` greedy of their merged model
alone; unknown adapters and unsupported ones are named errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax import adapters as L
from lm_jax.adapters.rows import num_adapters, select_rows, stack_adapters
from lm_jax.configs import llama_style
from lm_jax.errors import ConfigError
from lm_jax.generate import generate
from lm_jax.nn import Transformer
from lm_jax.nn.lora import ROWS
from lm_jax.serving.engine import Engine, EngineConfig, Request

CFG = llama_style(vocab_size=97, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2,
                  max_len=96, mlp_dim=48, tie_embeddings=False, initializer_range=0.3)  # fmt: skip
LORAS = {
    "qv": L.LoraConfig(rank=4, alpha=8.0, targets=(r"attn/[qv]_proj$",)),
    "mlp": L.LoraConfig(rank=2, alpha=4.0, rslora=True, targets=(r"mlp/", r"attn/o_proj$")),
}
STOP = 3


def _init(cfg, seed=1):
    x = jnp.zeros((1, 4), jnp.int32)
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), x)["params"])


def _adapters(name, seed):
    """A trained-looking adapter set: the LoRA init with B drawn at random (B = 0 is a no-op)."""
    full = _init(CFG.replace(lora=LORAS[name]), seed=1)
    _, ad = L.split_lora(full)
    leaves, tree = jax.tree_util.tree_flatten_with_path(ad)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [0.3 * jax.random.normal(k, x.shape) if str(p[-1].key) == "lora_b" else x
           for k, (p, x) in zip(keys, leaves)]  # fmt: skip
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def setup():
    base = _init(CFG)
    sets = {n: (_adapters(n, seed), LORAS[n]) for seed, n in enumerate(LORAS)}
    merged = {"": base}
    for n, (ad, lcfg) in sets.items():
        merged[n] = L.merge(L.combine(base, ad), CFG.replace(lora=lcfg))
    return base, sets, merged


@pytest.mark.parametrize("unroll", [1, 2])  # a scan over layers, and the unrolled blocks
def test_each_row_computes_its_merged_adapter(setup, unroll):
    base, sets, merged = setup
    cfg = CFG.replace(scan_unroll=unroll)
    bank = stack_adapters(base, [sets[n] for n in sorted(sets)])
    assert num_adapters(bank) == 2
    names = ["", *sorted(sets)]
    index = jnp.array([2, 0, 1, 2, 1], jnp.int32)  # rows: mlp, base, qv, mlp, qv
    tokens = jax.random.randint(jax.random.key(3), (5, 11), 0, 97)
    got = Transformer(cfg).apply({"params": base, ROWS: select_rows(bank, index)}, tokens)
    for b, i in enumerate(np.asarray(index)):
        want = Transformer(cfg).apply({"params": merged[names[i]]}, tokens[b : b + 1])
        np.testing.assert_allclose(got[b], want[0], rtol=1e-5, atol=1e-5)
    # the adapters do something: rows on different adapters differ from the base
    plain = Transformer(cfg).apply({"params": base}, tokens)
    assert float(jnp.max(jnp.abs(got[0] - plain[0]))) > 1e-2


def test_engine_mixes_adapters_in_one_running_batch(setup):
    base, sets, merged = setup
    rng = np.random.default_rng(0)
    names = ["", "qv", "mlp"]
    reqs = [
        Request([int(t) for t in rng.integers(4, 97, int(rng.integers(1, 30)))],
                max_tokens=int(rng.integers(4, 20)), temperature=0.0, stop_tokens=(STOP,),
                adapter=names[i % 3])  # fmt: skip
        for i in range(9)
    ]
    eng = Engine(CFG, base, EngineConfig(slots=4, max_len=64, decode_steps=2), adapters=sets)
    outs = eng.run(reqs)
    assert eng.decode_dispatches < sum(len(o.tokens) for o in outs) / 3  # batched together
    for name in names:
        mine = [(r, o) for r, o in zip(reqs, outs) if r.adapter == name]
        g = generate(CFG, merged[name], [r.prompt for r, _ in mine], jax.random.key(0),
                     max(r.max_tokens for r, _ in mine), 0.0, stop_tokens=(STOP,))  # fmt: skip
        for b, (r, o) in enumerate(mine):
            n = min(int(g.lengths[b]), r.max_tokens)
            assert o.tokens == np.asarray(g.tokens[b, :n]).tolist(), name
            np.testing.assert_allclose(o.logprobs, np.asarray(g.logprobs[b, :n]), atol=2e-4)
        if name:  # the adapter changes the output (else this test could not tell them apart)
            g0 = generate(CFG, base, [r.prompt for r, _ in mine], jax.random.key(0),
                          max(r.max_tokens for r, _ in mine), 0.0, stop_tokens=(STOP,))  # fmt: skip
            assert any(
                not np.allclose(o.logprobs[:1], np.asarray(g0.logprobs[b, :1]), atol=1e-3)
                for b, (_, o) in enumerate(mine)
            )


def test_unknown_and_unsupported_adapters_are_named(setup):
    base, sets, _ = setup
    eng = Engine(CFG, base, EngineConfig(slots=2, max_len=32), adapters=sets)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'.*'mlp', 'qv'"):
        eng.check(Request([5, 6], adapter="nope"))
    with pytest.raises(ValueError, match="unknown adapter 'qv'.*none"):
        Engine(CFG, base, EngineConfig(slots=2, max_len=32)).check(Request([5], adapter="qv"))
    head = L.LoraConfig(rank=2, targets=(r"lm_head$",))
    _, ad = L.split_lora(_init(CFG.replace(lora=head)))
    with pytest.raises(ConfigError, match="cannot target the LM head"):
        stack_adapters(base, [(ad, head)])
    small = CFG.replace(d_model=16, mlp_dim=24)
    _, other = L.split_lora(_init(small.replace(lora=LORAS["qv"])))
    with pytest.raises(ConfigError, match="do not fit the kernel"):
        stack_adapters(base, [(other, LORAS["qv"])])
