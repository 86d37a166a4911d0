"""transformers BERT <-> lm_jax encoder: random-init models of unusual sizes (hidden 48, 3 heads,
2 layers, intermediate 80, vocab 101, 37 positions, 3 token types) give the same hidden states,
pooled output and masked-LM / token / sequence logits (f32, <= 1e-4) with padding in the batch,
at every position; `to_hf` round trips are bitwise; folders load; bad configs fail clearly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lm_jax.configs import ConfigError
from lm_jax.convert import from_hf as decoder_from_hf
from lm_jax.convert import hf_bert
from lm_jax.nn.encoder import Encoder

TOL = 1e-4
V, P, TYPES, LABELS = 101, 37, 3, 5
CLASSES = {
    "none": transformers.BertModel,
    "mlm": transformers.BertForMaskedLM,
    "token": transformers.BertForTokenClassification,
    "sequence": transformers.BertForSequenceClassification,
}


def _config(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=80,
        max_position_embeddings=P,
        type_vocab_size=TYPES,
        num_labels=LABELS,
        pad_token_id=0,
    )
    return transformers.BertConfig(**{**base, **kw})


def _randomize(model, seed=0):
    """Weights far from HF's small init (std 0.02 hides mistakes): N(0, 0.3), LayerNorm scales
    around 1, so every tensor moves the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if "LayerNorm.weight" in name else noise)
    return model.eval()


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    B = 4
    ids = rng.integers(1, V, (B, P))
    types = rng.integers(0, TYPES, (B, P))
    mask = np.ones((B, P), np.int64)
    for b, n in enumerate((P, 30, 11, 1)):  # full length, padded rows, a lone [CLS]
        mask[b, n:] = 0
        ids[b, n:] = 0
        types[b, n:] = 0
    return ids, types, mask


def _hf(model, ids, types, mask):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask),
        )


def _ours(cfg, params, ids, types, mask):
    return Encoder(cfg).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask)
    )


def _diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {h: _randomize(cls(_config()), seed=i) for i, (h, cls) in enumerate(CLASSES.items())}


@pytest.mark.parametrize("head", list(CLASSES))
def test_outputs_match_hf_with_padding(models, head):
    ids, types, mask = _inputs()
    model = models[head]
    cfg, params = hf_bert.from_hf(model)
    assert cfg.head == head and cfg.pooler == (head in ("none", "sequence"))
    assert cfg.model.d_model == 48 and cfg.model.max_len == P and cfg.type_vocab_size == TYPES
    ref, out = _hf(model, ids, types, mask), _ours(cfg, params, ids, types, mask)
    if head == "none":
        assert _diff(ref.last_hidden_state, out.hidden_states) <= TOL
        assert _diff(ref.pooler_output, out.pooled) <= TOL
        assert out.logits is None
    else:
        assert cfg.num_labels == LABELS or head == "mlm"
        assert out.logits.shape == tuple(ref.logits.shape)
        assert _diff(ref.logits, out.logits) <= TOL, _diff(ref.logits, out.logits)
        assert np.abs(np.asarray(out.logits)).max() > 1.0  # not trivially small


def test_trunk_of_any_head(models):
    """head='none' reads the trunk of a BertForMaskedLM; its hidden states are the MLM's."""
    ids, types, mask = _inputs(1)
    cfg, params = hf_bert.from_hf(models["mlm"], head="none")
    assert set(params) == {"embed_tokens", "embed_positions", "embed_token_types", "embed_norm",
                           "layers"}  # fmt: skip
    with torch.no_grad():
        ref = models["mlm"].bert(
            input_ids=torch.tensor(ids),
            token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(mask),
        )
    assert _diff(ref.last_hidden_state, _ours(cfg, params, ids, types, mask).hidden_states) <= TOL


def test_untied_mlm_decoder():
    model = _randomize(transformers.BertForMaskedLM(_config(tie_word_embeddings=False)), 7)
    assert model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight
    cfg, params = hf_bert.from_hf(model)
    assert not cfg.model.tie_embeddings and "decoder" in params["mlm_head"]
    ids, types, mask = _inputs(2)
    assert (
        _diff(_hf(model, ids, types, mask).logits, _ours(cfg, params, ids, types, mask).logits)
        <= TOL
    )


@pytest.mark.parametrize("head", list(CLASSES))
def test_to_hf_round_trip_is_exact(models, head, tmp_path):
    model = models[head]
    cfg, params = hf_bert.from_hf(model)
    out = hf_bert.to_hf(cfg, params, str(tmp_path / head))
    with open(tmp_path / head / "config.json") as f:
        assert json.load(f)["architectures"] == [CLASSES[head].__name__]
    back = CLASSES[head].from_pretrained(out).eval()
    want, got = model.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    cfg2, params2 = hf_bert.from_hf(out)  # the folder, read without torch
    assert cfg2 == cfg
    flat = lambda t, p="": {  # noqa: E731
        k2: v2
        for k, v in t.items()
        for k2, v2 in (flat(v, f"{p}/{k}").items() if isinstance(v, dict) else [(f"{p}/{k}", v)])
    }
    a, b = flat(params), flat(params2)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    ids, types, mask = _inputs(3)
    ref = _hf(back, ids, types, mask)
    mine = _ours(cfg2, params2, ids, types, mask)
    if head == "none":
        assert _diff(ref.last_hidden_state, mine.hidden_states) <= TOL
    else:
        assert _diff(ref.logits, mine.logits) <= TOL


def test_save_pretrained_folder_loads(models, tmp_path):
    models["sequence"].save_pretrained(tmp_path)
    cfg, params = hf_bert.from_hf(str(tmp_path))
    cfg_obj, params_obj = hf_bert.from_hf(models["sequence"])
    assert cfg == cfg_obj and cfg.head == "sequence" and cfg.num_labels == LABELS
    assert np.array_equal(params["classifier"]["kernel"], params_obj["classifier"]["kernel"])


def test_unsupported_and_misrouted(tmp_path):
    with pytest.raises(ConfigError, match="position_embedding_type='relative_key'"):
        hf_bert.config_from_hf(_config(position_embedding_type="relative_key").to_dict())
    with pytest.raises(ConfigError, match="is_decoder"):
        hf_bert.config_from_hf(_config(is_decoder=True).to_dict())
    transformers.BertModel(_config()).save_pretrained(tmp_path)
    # the decoder loader points at this one
    with pytest.raises(ConfigError, match=r"encoder.*lm_jax\.convert\.hf_bert\.from_hf"):
        decoder_from_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        hf_bert.from_hf(str(tmp_path / "missing" / "deeper"))
    cfg, params = hf_bert.from_hf(str(tmp_path))
    params["embed_positions"] = params["embed_positions"][:10]  # checked before writing
    with pytest.raises(ConfigError, match="position_embeddings.weight' has shape"):
        hf_bert.to_hf(cfg, params, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
