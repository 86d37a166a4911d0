"""HF CLIPModel / SiglipModel (random init, tiny) -> lm_jax TwoTowers with the same weights."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_jax.convert.clip import two_tower_config_from_hf, two_tower_params_from_hf  # noqa: E402
from lm_jax.losses_contrastive import contrastive_logits  # noqa: E402
from lm_jax.nn.two_towers import TwoTowers  # noqa: E402

TOL = 1e-4


def _common(vocab, eos=None):
    text = dict(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=12,
    )  # fmt: skip
    if eos is not None:
        text.update(eos_token_id=eos, pad_token_id=0, bos_token_id=1)
    vision = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        image_size=16, patch_size=4, num_channels=3,
    )  # fmt: skip
    return text, vision


def _inputs(vocab, eos, rng):
    B, T = 3, 10
    ids = rng.integers(3, vocab - 1, size=(B, T))
    lengths = [10, 6, 4]
    mask = np.zeros((B, T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, n - 1] = eos
        ids[b, n:] = 0
        mask[b, :n] = 1
    pixels = rng.normal(size=(B, 3, 16, 16)).astype(np.float32)  # NCHW
    return ids, mask, pixels


def _run_ours(hf, ids, mask, pixels):
    cfg = two_tower_config_from_hf(hf.config)
    params = two_tower_params_from_hf(hf.state_dict(), cfg)
    out = jax.jit(lambda p, i, t, m: TwoTowers(cfg).apply({"params": p}, i, t, m))(
        params, pixels.transpose(0, 2, 3, 1), ids.astype(np.int32), None if mask is None else mask
    )
    logits = contrastive_logits(
        out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"]
    )
    return out, np.asarray(logits)


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_clip_parity():
    torch.manual_seed(0)
    vocab, eos = 99, 98
    text, vision = _common(vocab, eos)
    hf_cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    hf = transformers.CLIPModel(hf_cfg).eval()
    ids, mask, pixels = _inputs(vocab, eos, np.random.default_rng(0))
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pixels),
        )
    out, logits = _run_ours(hf, ids, mask.astype(bool), pixels)
    d_img = _diff(out["image_embeds"], ref.image_embeds.numpy())
    d_txt = _diff(out["text_embeds"], ref.text_embeds.numpy())
    d_log = _diff(logits, ref.logits_per_image.numpy())
    print(f"CLIP parity max|diff|: image {d_img:.2e} text {d_txt:.2e} logits {d_log:.2e}")
    assert d_img < TOL and d_txt < TOL and d_log < TOL


def test_siglip_parity():
    torch.manual_seed(0)
    vocab = 99
    text, vision = _common(vocab, 98)
    hf_cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    hf = transformers.SiglipModel(hf_cfg).eval()
    ids, _, pixels = _inputs(vocab, 98, np.random.default_rng(1))
    with torch.no_grad():  # SigLIP pools the last position (pads included): no mask
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
    out, logits = _run_ours(hf, ids, None, pixels)
    d_img = _diff(out["image_embeds"], ref.image_embeds.numpy())
    d_txt = _diff(out["text_embeds"], ref.text_embeds.numpy())
    d_log = _diff(logits, ref.logits_per_image.numpy())
    print(f"SigLIP parity max|diff|: image {d_img:.2e} text {d_txt:.2e} logits {d_log:.2e}")
    assert d_img < TOL and d_txt < TOL and d_log < TOL
