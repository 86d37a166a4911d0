"""`TrainConfig.loss_chunk`: the LM head and cross-entropy applied a chunk of positions at a
time give the unchunked loss and gradients (tied and untied heads, LoRA on the head, z-loss,
ragged last chunk, sharded), and the compiled step never holds the [B, T, V] logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import ConfigError, gpt2_style, llama_style
from lm_jax.configs.lora import LoraConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.losses import chunked_cross_entropy, cross_entropy
from lm_jax.nn.transformer import Transformer
from lm_jax.optim import make_optimizer
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train.state import init_train_state
from lm_jax.train.step import jit_train_step, loss_and_metrics


def _batch(B, T, V, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": mask,
    }


@pytest.mark.parametrize("chunk", [4, 5, 16, 40])  # divides T, ragged, T, longer than T
def test_chunked_cross_entropy_equals_cross_entropy_values_and_grads(chunk):
    B, T, D, V = 3, 16, 8, 50
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (D, V))
    t = jax.random.randint(k[2], (B, T), 0, V)
    m = (jnp.arange(T) % 5 != 0).astype(jnp.float32)[None].repeat(B, 0)

    def full(h, w):
        return cross_entropy(h @ w, t, m, z_loss=1e-2)

    def chunked(h, w):
        return chunked_cross_entropy(h, lambda x: x @ w, t, m, 1e-2, chunk)

    for a, b in zip(full(h, w), chunked(h, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    gf = jax.grad(lambda h, w: sum(full(h, w)[:2]), argnums=(0, 1))(h, w)
    gc = jax.grad(lambda h, w: sum(chunked(h, w)[:2]), argnums=(0, 1))(h, w)
    for a, b in zip(gf, gc, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


LORA_HEAD = LoraConfig(rank=4, targets=("lm_head", "q_proj"))
MODELS = {
    "gpt2_tied": gpt2_style(vocab_size=96, d_model=32, num_layers=2, num_heads=4, max_len=32),
    "llama_untied_lora_head": llama_style(
        vocab_size=96,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_len=32,
        tie_embeddings=False,
        lora=LORA_HEAD,
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_loss_and_every_gradient_match_the_unchunked_step(name):
    cfg = MODELS[name]
    batch = _batch(4, 24, cfg.vocab_size)
    params = Transformer(cfg).init(jax.random.key(1), batch["inputs"])["params"]
    if cfg.lora is not None:  # non-zero adapters, so the head's LoRA path counts
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params
        )
    grads = {}
    for chunk in (0, 7):
        tcfg = TrainConfig(z_loss=1e-3, loss_chunk=chunk)
        g, m = jax.grad(loss_and_metrics, has_aux=True)(
            params, batch, cfg, tcfg, jax.random.key(0), True
        )
        grads[chunk] = (g, m)
    (g0, m0), (g7, m7) = grads[0], grads[7]
    np.testing.assert_allclose(m7["nll_sum"], m0["nll_sum"], rtol=1e-6)
    np.testing.assert_allclose(m7["z_sum"], m0["z_sum"], rtol=1e-6)
    assert float(m7["tokens"]) == float(m0["tokens"])
    flat0 = jax.tree_util.tree_leaves_with_path(g0)
    flat7 = dict(jax.tree_util.tree_leaves_with_path(g7))
    assert len(flat0) == len(flat7)
    for path, a in flat0:
        b = flat7[path]
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a) + 1e-7, jax.tree_util.keystr(path)


def test_sharded_chunked_training_equals_single_device_unchunked():
    # no biases: the key projection's bias has a zero gradient, so Adam turns its ulp-level
    # noise into updates and a relative comparison of that leaf is ill-posed
    cfg = MODELS["gpt2_tied"].replace(use_bias=False)
    base = TrainConfig(steps=5, learning_rate=3e-3, warmup_steps=1)

    def run(spec, tcfg, devices=None):
        mesh = make_mesh(spec, devices=devices)
        tx = make_optimizer(tcfg)
        state, sh = init_train_state(cfg, tx, mesh, seed=0)
        bsh = batch_sharding(mesh, 2, 8)
        step = jit_train_step(cfg, tcfg, tx, sh, bsh)
        losses = []
        for i in range(5):
            b = {k: jax.device_put(v, bsh) for k, v in _batch(8, 16, cfg.vocab_size, i % 2).items()}
            state, m = step(state, b, jax.random.key(0))
            losses.append(float(m["loss"]))
        return losses, jax.device_get(state.params)

    ref_l, ref_p = run("", base, jax.devices()[:1])
    got_l, got_p = run("data:2,fsdp:2,tensor:2", base.replace(loss_chunk=4))
    np.testing.assert_allclose(got_l, ref_l, rtol=1e-5)
    # Adam divides by sqrt(v): float32 reduction-order noise in small gradients (another
    # summation order under sharding and chunking) comes out as ~1e-5 relative parameter noise
    # after 5 steps (1.2e-5 seen on one leaf); a wrong chunked gradient moves a leaf by >1e-2.
    flat_got = jax.tree_util.tree_leaves_with_path(got_p)
    for (path, a), b in zip(flat_got, jax.tree.leaves(ref_p), strict=True):
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= 5e-5, (jax.tree_util.keystr(path), rel)


def test_the_compiled_step_never_holds_the_full_logits():
    """Temporary memory of a step with V = 16384: unchunked it holds [B, T, V] float32 logits
    (and their gradient); chunked by 16 positions, its whole scratch is below one such array."""
    cfg = gpt2_style(vocab_size=16384, d_model=32, num_layers=1, num_heads=4, max_len=256)
    B, T = 4, 256
    logits_bytes = B * T * cfg.vocab_size * 4
    temps = {}
    for chunk in (0, 16):
        tcfg = TrainConfig(loss_chunk=chunk)
        tx = make_optimizer(tcfg)
        mesh = make_mesh("", devices=jax.devices()[:1])
        state, sh = init_train_state(cfg, tx, mesh, seed=0)
        bsh = batch_sharding(mesh, 2, B)
        batch = {k: jax.device_put(v, bsh) for k, v in _batch(B, T, cfg.vocab_size).items()}
        compiled = (
            jit_train_step(cfg, tcfg, tx, sh, bsh).lower(state, batch, jax.random.key(0)).compile()
        )
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[0] >= logits_bytes
    assert temps[16] < logits_bytes, (temps, logits_bytes)


def test_negative_loss_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="loss_chunk must be >= 0"):
        dataclasses.replace(TrainConfig(), loss_chunk=-1)
