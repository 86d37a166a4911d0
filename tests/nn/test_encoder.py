"""The BERT-family encoder on its own: config checks, one-line bad-input errors, padding
invariance, heads, dropout, and sharded (8 CPU devices: data x fsdp x tensor) = one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import ConfigError
from lm_jax.configs.encoder import EncoderConfig, bert_style
from lm_jax.errors import EncoderInputError, UserError
from lm_jax.nn.attention import Attention
from lm_jax.nn.encoder import Encoder, abstract_params, sentence_embedding
from lm_jax.sharding import make_mesh, params_shardings

SMALL = bert_style(vocab_size=97, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, max_len=24)


def _cfg(**kw):
    return EncoderConfig(model=SMALL, type_vocab_size=3, num_labels=3, **kw)


def _init(cfg, seed=0):
    init = jax.jit(lambda r: Encoder(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"])
    return init(jax.random.key(seed))


def _apply(cfg, params, *args, **kw):
    """Encoder(cfg).apply under jit (the scan compiles once per shape either way)."""
    return jax.jit(lambda p, *a: Encoder(cfg).apply({"params": p}, *a, **kw))(params, *args)


def _batch(B=4, T=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 97, (B, T)).astype(np.int32)
    types = rng.integers(0, 3, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b in range(1, B):
        n = int(rng.integers(2, T))
        mask[b, n:], ids[b, n:], types[b, n:] = 0, 0, 0
    return ids, types, mask


def test_config_checks_and_dict_round_trip():
    cfg = _cfg(head="mlm", pooler=False)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="head must be one of"):
        _cfg(head="ner")
    with pytest.raises(ConfigError, match="pooler=True"):
        _cfg(head="sequence", pooler=False)
    with pytest.raises(ConfigError, match="BERT-style"):
        EncoderConfig(model=SMALL.replace(norm="rmsnorm"))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        EncoderConfig(model=SMALL.replace(num_kv_heads=2))
    with pytest.raises(ConfigError, match="unknown EncoderConfig fields"):
        EncoderConfig.from_dict({"heads": "mlm"})


def test_bad_input_one_line_errors():
    cfg = _cfg()
    params = _init(cfg)
    model = Encoder(cfg)
    cases = [
        (dict(tokens=jnp.zeros((2, 25), jnp.int32)), r"25 tokens .*embeddings \(24\)"),
        (dict(tokens=jnp.zeros((25,), jnp.int32)), r"must be \[B, T\]"),
        (dict(tokens=jnp.zeros((2, 5), jnp.int32), token_type_ids=jnp.full((2, 5), 3)),
         r"token_type_ids must lie in \[0, 3\)"),
        (dict(tokens=jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((2, 6))),
         "attention_mask shape"),
        (dict(tokens=jnp.zeros((1, 5), jnp.int32), positions=jnp.arange(20, 25)[None]),
         r"position 24 is beyond"),
    ]  # fmt: skip
    for kw, pattern in cases:
        with pytest.raises(EncoderInputError, match=pattern) as e:
            model.apply({"params": params}, **kw)
        assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    # under jit the length is still checked while tracing
    with pytest.raises(EncoderInputError, match="max_position_embeddings"):
        jax.jit(lambda t: model.apply({"params": params}, t))(jnp.zeros((1, 30), jnp.int32))


def test_padding_does_not_change_real_tokens():
    """A sentence alone or padded inside a batch: the same hidden states on its tokens and the
    same sentence embedding (padding keys are masked, mean pooling skips them)."""
    cfg = _cfg()
    params = _init(cfg, 1)
    ids, types, mask = _batch(B=3)
    out = _apply(cfg, params, ids, types, mask)
    emb = sentence_embedding(out.hidden_states, mask)
    for b in range(3):
        n = int(mask[b].sum())
        alone = _apply(cfg, params, ids[b : b + 1, :n], types[b : b + 1, :n])
        np.testing.assert_allclose(out.hidden_states[b, :n], alone.hidden_states[0], atol=1e-5)
        np.testing.assert_allclose(emb[b], sentence_embedding(alone.hidden_states, None)[0],
                                   atol=1e-5)  # fmt: skip


def test_heads_shapes_and_dropout():
    ids, types, mask = _batch()
    for head, shape in (("mlm", (4, 24, 97)), ("token", (4, 24, 3)), ("sequence", (4, 3))):
        cfg = _cfg(head=head, pooler=head == "sequence")
        params = nn.unbox(abstract_params(cfg))  # shapes only: nothing compiles
        assert ("pooler" in params) == (head == "sequence")
        assert (head == "mlm") == ("mlm_head" in params) != ("classifier" in params)
        out = jax.eval_shape(lambda p, c=cfg: Encoder(c).apply({"params": p}, ids, types, mask),
                             params)  # fmt: skip
        assert out.logits.shape == shape and out.logits.dtype == jnp.float32
    cfg = _cfg(head="token", pooler=False).replace(model=SMALL.replace(dropout=0.3))
    params = _init(cfg)
    det = _apply(cfg, params, ids, types, mask)
    drop = _apply(cfg, params, ids, types, mask, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})  # fmt: skip
    assert not np.allclose(det.logits, drop.logits)


def test_key_mask_is_bidirectional_only():
    cfg = SMALL
    x = jnp.zeros((1, 4, 32))
    pos = jnp.arange(4)[None]
    attn = Attention(cfg, causal=True)
    p = attn.init(jax.random.key(0), x, pos)
    with pytest.raises(ValueError, match="bidirectional"):
        attn.apply(p, x, pos, key_mask=jnp.ones((1, 4), bool))


def _mlm_loss(cfg, params, ids, types, mask):
    logits = Encoder(cfg).apply({"params": params}, ids, types, mask).logits
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, ids[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


def test_sharded_equals_one_device():
    """MLM loss and gradients on a data:2,fsdp:2,tensor:2 mesh equal one device's."""
    assert jax.device_count() >= 8
    cfg = _cfg(head="mlm", pooler=False)
    params = _init(cfg, 3)
    ids, types, mask = _batch(B=8, seed=4)
    loss_fn = jax.value_and_grad(lambda p: _mlm_loss(cfg, p, ids, types, mask))
    l1, g1 = jax.jit(loss_fn)(nn.unbox(params))
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    shardings = params_shardings(abstract_params(cfg), mesh)
    with jax.set_mesh(mesh):
        placed = jax.device_put(nn.unbox(params), nn.unbox(shardings))
        q_spec = placed["layers"]["attn"]["q_proj"]["kernel"].sharding.spec
        assert "tensor" in str(q_spec)  # heads really are split
        l2, g2 = jax.jit(loss_fn)(placed)
    assert abs(float(l1) - float(l2)) <= 1e-5
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g1, g2)
    assert max(jax.tree.leaves(diffs)) <= 1e-5
