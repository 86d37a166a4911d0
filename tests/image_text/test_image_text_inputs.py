"""Bad input raises clear errors: image rank/size/channels/dtype, captions past the context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.data.scenes import SceneError, WordTokenizer, encode_texts
from lm_jax.generate import generate_with_prefix
from lm_jax.nn.two_towers import (
    CaptionerConfig,
    TextConfig,
    TextInputError,
    TwoTowerConfig,
    TwoTowers,
)
from lm_jax.nn.vision import ImageInputError, VisionConfig

BLK = dict(d_model=16, num_layers=1, num_heads=2, norm="layernorm", activation="gelu_tanh",
           gated_mlp=False, use_bias=True, position="learned")  # fmt: skip
VISION = VisionConfig(ModelConfig(vocab_size=1, max_len=1, **BLK), 16, 8, 1)
CFG = TwoTowerConfig(VISION, TextConfig(ModelConfig(vocab_size=20, max_len=8, **BLK)), 8)


@pytest.fixture(scope="module")
def params():
    x = jnp.zeros((1, 16, 16, 1))
    return TwoTowers(CFG).init(jax.random.key(0), x, jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize(
    "shape,dtype,match",
    [
        ((16, 16, 1), jnp.float32, r"\[B, H, W, C\]"),
        ((2, 16, 16, 3), jnp.float32, "3 channels but the vision tower expects 1"),
        ((2, 1, 16, 16), jnp.float32, "channels"),  # NCHW
        ((2, 28, 28, 1), jnp.float32, "28x28 but the vision tower expects 16x16"),
        ((2, 16, 16, 1), jnp.uint8, "floating point, got dtype uint8"),
        ((2, 16, 16, 1), jnp.int32, "floating point"),
    ],
)
def test_bad_images(params, shape, dtype, match):
    with pytest.raises(ImageInputError, match=match):
        TwoTowers(CFG).apply(params, jnp.zeros(shape, dtype), method=TwoTowers.encode_image)


def test_caption_longer_than_context(params):
    long = jnp.ones((2, 9), jnp.int32)  # text context is 8
    with pytest.raises(TextInputError, match="longer than the text tower's context of 8"):
        TwoTowers(CFG).apply(params, long, method=TwoTowers.encode_text)
    with pytest.raises(TextInputError, match="must be integer ids"):
        TwoTowers(CFG).apply(params, jnp.ones((2, 4)), method=TwoTowers.encode_text)
    tok = WordTokenizer.for_classes(["shirt"])
    with pytest.raises(SceneError, match="text context is 4"):
        encode_texts(tok, ["a small shirt in the center"], max_len=4)


def test_bad_configs_and_decode_length():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        VisionConfig(VISION.encoder, image_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="position='learned'"):
        VisionConfig(VISION.encoder.replace(position="rope"))
    dec = ModelConfig(vocab_size=20, max_len=4, **{**BLK, "position": "learned"})
    with pytest.raises(ConfigError, match="must exceed the 5 image prefix tokens"):
        CaptionerConfig(VISION, dec)
    cap = CaptionerConfig(VISION, dec.replace(max_len=10))
    with pytest.raises(TextInputError, match="lower max_new_tokens to 4"):
        generate_with_prefix(cap, {}, np.zeros((1, 16, 16, 1), np.float32), 1, 2, 8)
