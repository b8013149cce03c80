"""batch_norm_backward(..., out=) and BatchNorm.backward(grad_output, out=): the input
gradient written into a given array, in place over grad_output too.

Oracles: the allocating call (the same kernels: out= must not change a bit), the float64
NumPy reference (cbn._reference) for the values, and the arrays themselves for what must
stay untouched on error.
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn import _reference


def _case(shape, dtype, seed=0, axis=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    C = shape[axis]
    w = np.linspace(0.5, 1.5, C).astype(dtype)
    y, sm, si = cbn.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5, axis=axis)
    g = rng.standard_normal(shape).astype(dtype)
    return x, w, y, sm, si, g


SHAPES = [((64, 8), 1), ((4, 6, 5, 7), 1), ((4, 5, 7, 6), -1), ((3, 4, 2, 3, 20), 1),
          ((2, 3, 4096 + 5), 1)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_out_equals_the_allocating_call(shape, axis, dtype, training):
    x, w, y, sm, si, g = _case(shape, dtype, axis=axis)
    want = cbn.batch_norm_backward(g, x, w, sm, si, training, axis=axis)
    out = np.full(shape, np.nan, dtype)
    got = cbn.batch_norm_backward(g, x, w, sm, si, training, axis=axis, out=out)
    assert got[0] is out
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()
    ref = _reference.batch_norm_backward(g.astype(np.float64), x.astype(np.float64),
                                         w.astype(np.float64), sm.astype(np.float64),
                                         si.astype(np.float64), training, axis=axis)[0]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert np.allclose(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nt", [1, 2, 3])
def test_in_place_over_grad_output(dtype, nt):
    x, w, y, sm, si, g = _case((8, 6, 300), dtype, seed=1)
    want = cbn.batch_norm_backward(g, x, w, sm, si, True, n_threads=nt)
    g2 = g.copy()
    got = cbn.batch_norm_backward(g2, x, w, sm, si, True, n_threads=nt, out=g2)
    assert got[0] is g2
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()


def test_in_place_with_relu_and_residual():
    x, w, _, _, _, g = _case((6, 4, 50), np.float32, seed=2)
    r = np.ones_like(x)
    y, sm, si = cbn.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5,
                                       activation="relu", residual=r)
    want = cbn.batch_norm_backward(g, x, w, sm, si, True, activation="relu", output=y,
                                   residual=True)
    g2 = g.copy()
    got = cbn.batch_norm_backward(g2, x, w, sm, si, True, activation="relu", output=y,
                                  residual=True, out=g2)
    assert got[0] is g2 and len(got) == 4
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()


def test_general_path_out_layouts_and_half():
    # A Fortran-ordered out, a strided grad_output, a float16 input (computed in float32).
    x, w, y, sm, si, g = _case((5, 4, 6, 3), np.float64, seed=3)
    out = np.empty((5, 4, 6, 3), np.float64, order="F")
    want = cbn.batch_norm_backward(g, x, w, sm, si, True)
    got = cbn.batch_norm_backward(g, x, w, sm, si, True, out=out)
    assert got[0] is out and out.tobytes() == np.asarray(want[0], order="F").tobytes()
    gs = np.repeat(g, 2, axis=3)[..., ::2]
    assert not gs.flags.c_contiguous
    got = cbn.batch_norm_backward(gs, x, w, sm, si, True, out=out)
    assert np.array_equal(out, want[0])
    xh = x.astype(np.float16)
    _, smh, sih = cbn.batch_norm_forward(xh, None, None, None, None, True, 0.1, 1e-5)
    gh = g.astype(np.float16)
    want = cbn.batch_norm_backward(gh, xh, None, smh, sih, True)
    outh = np.empty_like(xh)
    got = cbn.batch_norm_backward(gh, xh, None, smh, sih, True, out=outh)
    assert got[0] is outh and outh.tobytes() == want[0].tobytes()


def test_out_sharing_memory_with_inputs_gets_the_right_values():
    # out is x, or a view overlapping grad_output without being it: computed aside,
    # then copied (no partly read, partly written input).
    x, w, y, sm, si, g = _case((4, 3, 40), np.float32, seed=4)
    want = cbn.batch_norm_backward(g, x, w, sm, si, True)[0]
    xc = x.copy()
    got = cbn.batch_norm_backward(g, xc, w, sm, si, True, out=xc)[0]
    assert got is xc and got.tobytes() == want.tobytes()
    buf = np.zeros(x.size + 8, np.float32)
    gv = buf[8:].reshape(x.shape)
    gv[...] = g
    ov = buf[:-8].reshape(x.shape)
    got = cbn.batch_norm_backward(gv, x, w, sm, si, True, out=ov)[0]
    assert got is ov and got.tobytes() == want.tobytes()


BAD_OUT = [
    (lambda x: [[0.0]], TypeError, "out must be a numpy.ndarray"),
    (lambda x: np.empty(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype), ValueError,
     "out has shape"),
    (lambda x: np.empty(x.shape, np.float64), ValueError, "out has dtype"),
    (lambda x: np.broadcast_to(np.zeros(1, x.dtype), x.shape), ValueError, "writable"),
]


@pytest.mark.parametrize("make,exc,msg", BAD_OUT, ids=["list", "shape", "dtype", "readonly"])
def test_bad_out_raises_and_writes_nothing(make, exc, msg):
    x, w, y, sm, si, g = _case((4, 3, 20), np.float32, seed=5)
    out = make(x)
    before = [a.copy() for a in (x, g, sm, si)]
    saved_out = np.array(out, copy=True)
    with pytest.raises(exc, match=msg):
        cbn.batch_norm_backward(g, x, w, sm, si, True, out=out)
    for a, b in zip((x, g, sm, si), before):
        assert a.tobytes() == b.tobytes()
    assert np.array_equal(np.asarray(out), saved_out, equal_nan=True)


def test_module_backward_out():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    a = cbn.BatchNorm2d(3)
    b = cbn.BatchNorm2d(3)
    a(x)
    b(x)
    want = a.backward(g)
    out = np.empty_like(x)
    got = b.backward(g, out=out)
    assert got is out and out.tobytes() == want.tobytes()
    assert b.grad_weight.tobytes() == a.grad_weight.tobytes()
    g2 = g.copy()
    got = b.backward(g2, out=g2)                 # in place; grads accumulate again
    assert got is g2 and g2.tobytes() == want.tobytes()
    assert np.array_equal(b.grad_bias, 2 * a.grad_bias)


def test_module_backward_bad_out_leaves_grads():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    bn = cbn.BatchNorm2d(3)
    bn(x)
    bn.backward(np.ones_like(x))
    gw, gb = bn.grad_weight.copy(), bn.grad_bias.copy()
    with pytest.raises(ValueError, match="out has dtype"):
        bn.backward(np.ones_like(x), out=np.empty(x.shape, np.float64))
    assert np.array_equal(bn.grad_weight, gw) and np.array_equal(bn.grad_bias, gb)
