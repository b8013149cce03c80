"""cbn.jax: cbn's kernels as XLA custom calls under jit, grad and vmap.

Oracles: cbn's NumPy API on the same values (bit for bit: the custom call is the same core
entry), a batch norm written in plain jax.numpy (under jit, grad and vmap, to rounding),
and jax.test_util.check_grads (finite differences of the op itself). Skips without jax.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import cbn  # noqa: E402
import cbn.jax as cj  # noqa: E402

CASES = [((8, 3, 4, 4), 1), ((64, 12), 1), ((4, 5, 5, 6), -1), ((2, 4, 3, 4, 5), 1)]
IDS = ["x".join(map(str, s)) + f"-ax{a}" for s, a in CASES]


def _data(shape, axis, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype)
    rm, rv = rng.uniform(-1, 1, C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    return x, w, b, rm, rv


def _x64():
    """float64 arrays for the block (jax.enable_x64, or its experimental ancestor)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64
    return enable_x64()


def _pure(x, w, b, training, rm, rv, axis, eps=1e-5):
    """Batch norm in plain jax.numpy (the oracle under jit, grad and vmap)."""
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    if training:
        mean = x.mean(axis=red)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    else:
        mean, var = rm, rv
    w, b = jnp.asarray(w), jnp.asarray(b)
    w, b = (v.reshape(shape) if v.ndim else v for v in (w, b))
    return (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps) * w + b


@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_forward_is_cbn_bit_for_bit(shape, axis, training):
    x, w, b, rm, rv = _data(shape, axis)
    rm1, rv1 = rm.copy(), rv.copy()
    ey = cbn.batch_norm(x, rm1, rv1, w, b, training, 0.1, 1e-5, axis=axis)
    f = jax.jit(lambda x, rm, rv, w, b: cj.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5,
                                                      axis=axis))
    y, nrm, nrv = f(x, rm, rv, w, b)
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32
    assert np.asarray(y).tobytes() == ey.tobytes()
    assert np.asarray(nrm).tobytes() == rm1.tobytes()
    assert np.asarray(nrv).tobytes() == rv1.tobytes()


def test_float64():
    x, w, b, rm, rv = _data((16, 4, 9), 1, np.float64)
    with _x64():
        y, _, _ = cj.batch_norm(jnp.asarray(x), None, None, jnp.asarray(w), jnp.asarray(b),
                                training=True)
        assert y.dtype == jnp.float64
        ey = cbn.batch_norm(x, None, None, w, b, True)
        assert np.asarray(y).tobytes() == ey.tobytes()
        g = jax.grad(lambda x: (cj.batch_norm(x, None, None, training=True)[0] ** 3).sum())(
            jnp.asarray(x))
        eg = jax.grad(lambda x: (_pure(x, 1.0, 0.0, True, None, None, 1) ** 3).sum())(
            jnp.asarray(x))
        np.testing.assert_allclose(g, eg, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_pure_jax_under_jit(shape, axis, training):
    x, w, b, rm, rv = _data(shape, axis)
    g = np.random.default_rng(9).standard_normal(shape).astype(np.float32)

    def loss_cbn(x, w, b):
        return (cj.batch_norm(x, rm, rv, w, b, training, axis=axis)[0] * g).sum()

    def loss_pure(x, w, b):
        return (_pure(x, w, b, training, rm, rv, axis) * g).sum()

    got = jax.jit(jax.grad(loss_cbn, argnums=(0, 1, 2)))(x, w, b)
    want = jax.jit(jax.grad(loss_pure, argnums=(0, 1, 2)))(x, w, b)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-4)
    # and they are cbn's backward, bit for bit
    _, sm, si = cbn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training, 0.1, 1e-5,
                                       axis=axis)
    ex = cbn.batch_norm_backward(g, x, w, sm, si, training, axis=axis)
    for a, e in zip(got, ex):
        assert np.asarray(a).tobytes() == e.tobytes()


def test_check_grads():
    x, w, b, rm, rv = _data((6, 3, 5), 1, np.float64)
    with _x64():
        def f(x, w, b):
            return cj.batch_norm(x, None, None, w, b, training=True)[0]
        check_grads(f, (jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)), order=1,
                    modes=["rev"])


def test_vmap_is_a_batch_norm_per_element():
    xs = np.random.default_rng(2).standard_normal((5, 16, 3, 7)).astype(np.float32)
    f = jax.vmap(lambda x: cj.batch_norm(x, None, None, training=True)[0])
    y = jax.jit(f)(xs)
    for i in range(5):
        assert np.asarray(y[i]).tobytes() == cbn.batch_norm(xs[i], None, None,
                                                            training=True).tobytes()
    gy = jax.grad(lambda xs: (f(xs) ** 2).sum())(xs)
    ge = jax.grad(lambda xs: (jax.vmap(lambda x: _pure(x, 1.0, 0.0, True, None, None, 1))(xs)
                              ** 2).sum())(xs)
    np.testing.assert_allclose(gy, ge, rtol=2e-4, atol=2e-4)


def test_the_lowered_program_calls_cbn_and_no_python():
    x = jnp.ones((8, 3, 4))
    f = jax.jit(jax.grad(lambda x: cj.batch_norm(x, None, None, training=True)[0].sum()))
    text = f.lower(x).as_text()
    assert "custom_call @cbn_forward" in text and "custom_call @cbn_backward" in text
    assert "callback" not in text.lower()


def test_fused_relu():
    x, w, b, rm, rv = _data((16, 4, 6), 1)
    y, _, _ = cj.batch_norm(x, None, None, w, b, training=True, activation="relu")
    ey = cbn.batch_norm(x, None, None, w, b, True, activation="relu")
    assert np.asarray(y).tobytes() == ey.tobytes()
    g = jax.grad(lambda x: (cj.batch_norm(x, None, None, w, b, True,
                                          activation="relu")[0] ** 2).sum())(x)
    eg = jax.grad(lambda x: (jax.nn.relu(_pure(x, w, b, True, None, None, 1)) ** 2).sum())(x)
    np.testing.assert_allclose(g, eg, rtol=2e-4, atol=2e-4)


def test_half_precision_is_computed_in_float32():
    x, w, b, _, _ = _data((16, 4, 6), 1)
    y, _, _ = cj.batch_norm(jnp.asarray(x, jnp.bfloat16), None, None, w, b, training=True)
    assert y.dtype == jnp.bfloat16
    ey = cbn.batch_norm(np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float32), None,
                        None, w, b, True)
    assert np.asarray(y.astype(jnp.float32)).tobytes() == np.asarray(
        jnp.asarray(ey, jnp.bfloat16).astype(jnp.float32)).tobytes()


def test_errors():
    x = jnp.ones((4, 3, 2))
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        cj.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="activation must be"):
        cj.batch_norm(x, None, None, training=True, activation="gelu")
    with pytest.raises(ValueError, match="expected 2D to 5D input"):
        cj.batch_norm(jnp.ones(3), None, None, training=True)
    with pytest.raises(Exception, match="Expected more than 1 value per channel"):
        jax.block_until_ready(cj.batch_norm(jnp.ones((1, 4)), None, None, training=True)[0])
    with pytest.raises(Exception, match="eps must be a finite non-negative number"):
        jax.block_until_ready(cj.batch_norm(x, None, None, training=True, eps=-1.0)[0])
