"""``out=`` for every output, and ``unbiased=`` in the functional API (issue 20, item 5).

``out=`` takes one array for the first output (as before) or a tuple with one array (or
None) per returned value; the returned objects are those arrays, holding exactly what the
allocating call returns (the oracle here: the same call without ``out``). A bad entry
raises an error naming it ("out[1]") and nothing is written. ``unbiased=False`` updates
the running variance with the biased batch variance; the oracle is the float64 NumPy
formula written out in the test.
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn.functional import normalize

SENTINEL = -7.25


def _x(shape=(16, 5, 7), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).normal(0.5, 3.0, shape).astype(dtype)


def _like(a, fill=SENTINEL):
    return np.full(a.shape, fill, dtype=a.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("training", [True, False])
def test_forward_out_tuple(dtype, training):
    x = _x(dtype=dtype)
    cdt = np.float64 if dtype == np.float64 else np.float32
    w, b = np.linspace(0.5, 2, 5).astype(cdt), np.linspace(-1, 1, 5).astype(cdt)
    rm0, rv0 = np.linspace(-1, 1, 5).astype(cdt), np.linspace(0.5, 3, 5).astype(cdt)
    rm, rv = rm0.copy(), rv0.copy()
    expected = cbn.batch_norm_forward(x, w, b, rm, rv, training, 0.2, 1e-5)
    rm2, rv2 = rm0.copy(), rv0.copy()
    out = tuple(_like(e) for e in expected)
    got = cbn.batch_norm_forward(x, w, b, rm2, rv2, training, 0.2, 1e-5, out=out)
    assert all(g is o for g, o in zip(got, out))
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(rm2, rm)
    np.testing.assert_array_equal(rv2, rv)
    # None entries are allocated; a strided (C,) entry is written too
    big = np.full(10, SENTINEL, cdt)
    got = cbn.batch_norm_forward(x, w, b, rm0.copy(), rv0.copy(), training, 0.2, 1e-5,
                                 out=(None, None, big[::2]))
    assert got[2].base is big
    np.testing.assert_array_equal(big[::2], expected[2])
    np.testing.assert_array_equal(big[1::2], SENTINEL)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_batch_norm_and_normalize_take_a_one_tuple():
    x = _x()
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    y = cbn.batch_norm(x, rm, rv)
    o = _like(y)
    assert cbn.batch_norm(x, rm, rv, out=(o,)) is o
    np.testing.assert_array_equal(o, y)
    assert type(cbn.batch_norm(x, rm, rv, out=(None,))) is np.ndarray
    with pytest.raises(ValueError, match=r"tuple of 1 .*got a tuple of 3"):
        cbn.batch_norm(x, rm, rv, out=(o, None, None))
    with pytest.raises(ValueError, match=r"out\[0\] has shape"):
        cbn.batch_norm(x, rm, rv, out=(np.empty((3, 3), np.float32),))
    scale, shift = np.full(5, 2.0, np.float32), np.ones(5, np.float32)
    y = normalize(x, rm, scale, shift)
    o = _like(y)
    assert normalize(x, rm, scale, shift, out=(o,)) is o
    np.testing.assert_array_equal(o, y)
    with pytest.raises(ValueError, match=r"out\[0\] has dtype"):
        normalize(x, rm, scale, shift, out=(np.empty(x.shape),))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_backward_out_tuple(dtype, residual):
    x, dy = _x(dtype=dtype, seed=1), _x(dtype=dtype, seed=2)
    cdt = np.float64 if dtype == np.float64 else np.float32
    w = np.linspace(0.5, 2, 5).astype(cdt)
    y, sm, si = cbn.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5,
                                       activation="relu")
    kw = dict(activation="relu", output=y, residual=residual)
    expected = cbn.batch_norm_backward(dy, x, w, sm, si, **kw)
    assert len(expected) == (4 if residual else 3)
    out = tuple(_like(e) for e in expected)
    got = cbn.batch_norm_backward(dy, x, w, sm, si, out=out, **kw)
    assert all(g is o for g, o in zip(got, out))
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    if residual:
        # grad_residual into grad_output's own memory: the right values all the same
        dy2 = dy.copy()
        got = cbn.batch_norm_backward(dy2, x, w, sm, si, out=(None, None, None, dy2), **kw)
        assert got[3] is dy2
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


def _snapshot(*arrays):
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("bad, match", [
    (lambda y, C: (None, np.empty(C + 1, np.float32), None), r"out\[1\] has shape \(6,\)"),
    (lambda y, C: (None, None, np.empty(C, np.float64)), r"out\[2\] has dtype float64"),
    (lambda y, C: (None, np.empty((C, 1), np.float32), None), r"out\[1\] has shape"),
    (lambda y, C: (np.empty((2, 2), np.float32), None, None), r"out\[0\] has shape"),
    (lambda y, C: (None, [0.0] * C, None), r"out\[1\] must be a numpy.ndarray"),
    (lambda y, C: (None, None), r"tuple of 3 .*got a tuple of 2"),
])
def test_forward_bad_out_entry_writes_nothing(bad, match):
    x = _x()
    C = 5
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y0 = _like(x)
    keep = [y0, np.full(C, SENTINEL, np.float32), np.full(C, SENTINEL, np.float32)]
    out = bad(x, C)
    # the good entries of the tuple are the sentinel arrays
    if len(out) == 3:
        out = tuple(k if o is None else o for o, k in zip(out, keep))
    before = _snapshot(rm, rv, *keep)
    with pytest.raises((ValueError, TypeError), match=match):
        cbn.batch_norm_forward(x, None, None, rm, rv, True, 0.1, 1e-5, out=out)
    assert _snapshot(rm, rv, *keep) == before


def test_read_only_out_entry_writes_nothing():
    x = _x()
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    y0, sm = _like(x), np.full(5, SENTINEL, np.float32)
    ro = np.zeros(5, np.float32)
    ro.flags.writeable = False
    before = _snapshot(rm, rv, y0, sm)
    with pytest.raises(ValueError, match=r"out\[2\] must be writable"):
        cbn.batch_norm_forward(x, None, None, rm, rv, True, 0.1, 1e-5, out=(y0, sm, ro))
    assert _snapshot(rm, rv, y0, sm) == before
    dy = _x(seed=3)
    _, smean, sinv = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gx, gw = _like(x), np.full(5, SENTINEL, np.float32)
    before = _snapshot(gx, gw)
    with pytest.raises(ValueError, match=r"out\[2\] must be writable"):
        cbn.batch_norm_backward(dy, x, None, smean, sinv, out=(gx, gw, ro))
    with pytest.raises(ValueError, match=r"out\[3\] has shape"):
        cbn.batch_norm_backward(dy, x, None, smean, sinv, residual=True,
                                out=(gx, gw, None, np.empty(5, np.float32)))
    with pytest.raises(ValueError, match=r"tuple of 4 .*got a tuple of 3"):
        cbn.batch_norm_backward(dy, x, None, smean, sinv, residual=True, out=(gx, gw, None))
    assert _snapshot(gx, gw) == before


def test_out_tuple_of_torch_tensors():
    torch = pytest.importorskip("torch")
    x = _x()
    expected = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    out = (torch.empty(x.shape), torch.empty(5), None)
    got = cbn.batch_norm_forward(torch.from_numpy(x), None, None, None, None, True, 0.1,
                                 1e-5, out=out)
    assert got[0] is out[0] and got[1] is out[1] and isinstance(got[2], torch.Tensor)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.numpy(), e)
    with pytest.raises(ValueError, match=r"out\[1\] has shape"):
        cbn.batch_norm_forward(torch.from_numpy(x), None, None, None, None, True, 0.1, 1e-5,
                               out=(None, torch.empty(4), None))


# --------------------------------------------------------------------------- unbiased


def _biased_reference(x, axis, rv0, momentum):
    xd = x.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return (1 - momentum) * rv0.astype(np.float64) + momentum * xd.var(axis=red)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 2e-6),
                                         (np.float16, 2e-6)])
@pytest.mark.parametrize("shape, axis", [((16, 5, 7), 1), ((32, 5), 1), ((4, 6, 6, 5), -1)])
def test_unbiased_false_matches_the_biased_formula(dtype, rtol, shape, axis):
    x = _x(shape, dtype)
    C = shape[axis]
    cdt = np.float64 if dtype == np.float64 else np.float32
    rv0 = np.linspace(0.5, 2.0, C).astype(cdt)
    rm, rv = np.zeros(C, cdt), rv0.copy()
    y = cbn.batch_norm(x, rm, rv, training=True, momentum=0.3, axis=axis, unbiased=False)
    np.testing.assert_allclose(rv, _biased_reference(x, axis, rv0, 0.3), rtol=rtol)
    # the output and the running mean are those of the default (unbiased) convention
    rm_u, rv_u = np.zeros(C, cdt), rv0.copy()
    y_u = cbn.batch_norm(x, rm_u, rv_u, training=True, momentum=0.3, axis=axis)
    np.testing.assert_array_equal(y, y_u)
    np.testing.assert_array_equal(rm, rm_u)
    n = x.size // C
    xd = x.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(rv_u, 0.7 * rv0 + 0.3 * xd.var(axis=red) * n / (n - 1),
                               rtol=rtol)
    # batch_norm_forward likewise; its saved statistics do not depend on the convention
    rv2 = rv0.copy()
    _, sm, si = cbn.batch_norm_forward(x, None, None, None, rv2, True, 0.3, 1e-5, axis=axis,
                                       unbiased=False)
    np.testing.assert_array_equal(rv2, rv)
    _, sm_u, si_u = cbn.batch_norm_forward(x, None, None, None, None, True, 0.3, 1e-5,
                                           axis=axis)
    np.testing.assert_array_equal(sm, sm_u)
    np.testing.assert_array_equal(si, si_u)


def test_unbiased_false_strided_running_var_and_eval():
    x = _x((12, 4))
    big = np.ones(8)
    rv = big[::2]
    cbn.batch_norm(x.astype(np.float64), None, rv, training=True, momentum=0.5,
                   unbiased=False)
    np.testing.assert_allclose(rv, _biased_reference(x, 1, np.ones(4), 0.5), rtol=1e-13)
    np.testing.assert_array_equal(big[1::2], 1.0)
    # eval: nothing is updated, the result is the usual one
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    np.testing.assert_array_equal(cbn.batch_norm(x, rm, rv, unbiased=False),
                                  cbn.batch_norm(x, rm, rv))
    np.testing.assert_array_equal(rv, 1.0)


def test_unbiased_errors_write_nothing():
    x = _x((12, 4))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        cbn.batch_norm(x, rm, rv, training=True, unbiased="no")
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="running_var is updated in place"):
        cbn.batch_norm(x, rm, ro, training=True, unbiased=False)
    with pytest.raises(ValueError, match="running_var should contain 4 elements not 3"):
        cbn.batch_norm(x, rm, np.ones(3, np.float32), training=True, unbiased=False)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_unbiased_false_through_the_edge_rescue():
    # float32 values near 1e19: squared deviations overflow float32, so the kernel's
    # statistics are recomputed with scaling (functional._rescue); the biased update
    # follows the rescued unbiased one
    x = (np.random.default_rng(4).standard_normal((64, 3)) * 1e19).astype(np.float32)
    rv = np.ones(3, np.float32)
    y = cbn.batch_norm(x, None, rv, training=True, momentum=0.5, unbiased=False)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(rv, _biased_reference(x, 1, np.ones(3), 0.5), rtol=2e-6)
