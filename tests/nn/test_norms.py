"""The hand-written norm backward passes equal autodiff of the textbook formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.nn.layers import layer_norm, layer_norm_autodiff, rms_norm, rms_norm_autodiff


def _ln_ref(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return (xf - mean) / jnp.sqrt(var + eps) * scale + bias


def _rms_ref(x, scale, eps):
    xf = x.astype(jnp.float32)
    return xf / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * scale


def _data(dtype, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(3.0 * r.standard_normal((3, 5, 32)) + 1.0, dtype)
    scale, bias = (jnp.asarray(r.standard_normal(32), jnp.float32) for _ in range(2))
    w = jnp.asarray(r.standard_normal((3, 5, 32)), jnp.float32)
    return x, scale, bias, w


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_forward_and_grads_equal_autodiff_f32(kind):
    x, scale, bias, w = _data(jnp.float32)
    if kind == "layernorm":
        ours = lambda x, s, b: jnp.sum(layer_norm(x, s, b, 1e-5) * w)  # noqa: E731
        ref = lambda x, s, b: jnp.sum(_ln_ref(x, s, b, 1e-5) * w)  # noqa: E731
    else:
        ours = lambda x, s, b: jnp.sum(rms_norm(x, s, 1e-6) * w)  # noqa: E731
        ref = lambda x, s, b: jnp.sum(_rms_ref(x, s, 1e-6) * w)  # noqa: E731
    v, g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(x, scale, bias)
    rv, rg = jax.value_and_grad(ref, argnums=(0, 1, 2))(x, scale, bias)
    np.testing.assert_allclose(v, rv, rtol=1e-5)
    for name, a, b in zip(("x", "scale", "bias"), g, rg):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
    assert float(jnp.abs(g[0]).max()) > 1e-2


def test_bf16_input_gets_bf16_gradient_close_to_f32():
    x, scale, bias, w = _data(jnp.bfloat16, seed=1)
    f = lambda x, s, b: jnp.sum(layer_norm(x, s, b, 1e-5) * w)  # noqa: E731
    g = jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)
    g32 = jax.grad(f, argnums=(0, 1, 2))(x.astype(jnp.float32), scale, bias)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.float32
    np.testing.assert_allclose(g[0].astype(jnp.float32), g32[0], atol=3e-2, rtol=3e-2)
    gr = jax.grad(lambda x, s: jnp.sum(rms_norm(x, s, 1e-6) * w), argnums=(0, 1))(x, scale)
    assert gr[0].dtype == jnp.bfloat16 and bool(jnp.isfinite(gr[0].astype(jnp.float32)).all())


def test_autodiff_baselines_match_the_hand_written_backward():
    """The benchmarks' A/B baseline (`*_autodiff`) is the same function with JAX's backward."""
    x, scale, bias, w = _data(jnp.float32, seed=2)
    pairs = [
        (lambda f: lambda x, s, b: jnp.sum(f(x, s, b, 1e-5) * w), layer_norm, layer_norm_autodiff),
        (lambda f: lambda x, s, b: jnp.sum(f(x, s, 1e-6) * w), rms_norm, rms_norm_autodiff),
    ]
    for wrap, ours, base in pairs:
        g = jax.grad(wrap(ours), argnums=(0, 1))(x, scale, bias)
        r = jax.grad(wrap(base), argnums=(0, 1))(x, scale, bias)
        for a, b in zip(g, r):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
