"""The kernels' stages (cbn._stages), alone and composed.

Composed in the fused order, the stages must reproduce batch_norm_forward and
batch_norm_backward bit for bit (SyncBatchNorm and PreciseBN rely on it); alone, each must
match the float64 reference.
"""

import numpy as np
import pytest

import cbn
from cbn import _stages
from cbn._reference import batch_norm_backward as batch_norm_backward_ref
from cbn._reference import batch_norm_forward as batch_norm_forward_ref

# (shape, axis): planes (K >= 16), rows (channels-last, 2-D), short planes, glued rows.
CASES = [((4, 6, 40), 1), ((3, 5, 7, 9), 1), ((64, 12), 1), ((8, 5, 5, 12), -1),
         ((2, 3, 17), 1), ((6, 4, 3), 1), ((2, 4, 3, 4, 5), 1), ((300, 40), 1)]


def _data(shape, dtype, seed, offset=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + offset).astype(dtype)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_forward_composition_is_the_fused_forward(shape, axis, dtype, n_threads):
    x = _data(shape, dtype, 1, offset=50.0)
    C = shape[axis]
    w, b = _data(C, dtype, 2), _data(C, dtype, 3)
    rm1, rv1 = _data(C, dtype, 4), np.abs(_data(C, dtype, 5))
    rm2, rv2 = rm1.copy(), rv1.copy()
    y1, m1, i1 = cbn.batch_norm_forward(x, w, b, rm1, rv1, True, 0.1, 1e-5, axis=axis,
                                        n_threads=n_threads)
    mom = _stages.moments(x, axis=axis, n_threads=n_threads)
    st = _stages.finish(mom, 1e-5, dtype=dtype, weight=w, bias=b, running_mean=rm2,
                        running_var=rv2, momentum=0.1)
    y2 = _stages.normalize(x, st, axis=axis, n_threads=n_threads)
    for a, c in [(y1, y2), (m1, st.save_mean), (i1, st.save_invstd), (rm1, rm2), (rv1, rv2)]:
        _same(a, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_composition_is_the_fused_backward(shape, axis, dtype):
    x = _data(shape, dtype, 6)
    dy = _data(shape, dtype, 7)
    C = shape[axis]
    w = _data(C, dtype, 8)
    y, mean, inv = cbn.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5, axis=axis)
    gx1, gw1, gb1 = cbn.batch_norm_backward(dy, x, w, mean, inv, True, axis=axis)
    s1, s2 = _stages.backward_reduce(dy, x, mean, axis=axis)
    count = x.size // C
    gx2 = _stages.backward_elements(dy, x, w, mean, inv, s1, s2, count, axis=axis)
    gw2, gb2 = _stages.parameter_grads(s1, s2, inv, dtype)
    for a, c in [(gx1, gx2), (gw1, gw2), (gb1, gb2)]:
        _same(a, c)


@pytest.mark.parametrize("shape,axis", CASES)
def test_relu_backward_composition(shape, axis):
    x = _data(shape, np.float32, 9)
    dy = _data(shape, np.float32, 10)
    y, mean, inv = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5,
                                          axis=axis, activation="relu")
    gx1, gw1, gb1 = cbn.batch_norm_backward(dy, x, None, mean, inv, True, axis=axis,
                                            activation="relu", output=y)
    s1, s2 = _stages.backward_reduce(dy, x, mean, axis=axis, activation="relu", output=y)
    gx2 = _stages.backward_elements(dy, x, None, mean, inv, s1, s2, x.size // shape[axis],
                                    axis=axis, activation="relu", output=y)
    _same(gx1, gx2)
    gw2, gb2 = _stages.parameter_grads(s1, s2, inv, np.float32)
    _same(gw1, gw2)
    _same(gb1, gb2)


@pytest.mark.parametrize("shape,axis", CASES)
def test_moments_match_the_reference(shape, axis):
    x = _data(shape, np.float64, 11, offset=1e4)
    mom = _stages.moments(x, axis=axis)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    xl = x.astype(np.longdouble)
    mean = xl.mean(axis=red)
    m2 = ((xl - np.expand_dims(mean, red)) ** 2).sum(axis=red)
    assert mom.count == x.size // shape[ax]
    np.testing.assert_allclose(mom.mean, mean.astype(np.float64), rtol=1e-15, atol=0)
    np.testing.assert_allclose(mom.m2, m2.astype(np.float64), rtol=1e-12)


def test_merged_moments_are_those_of_the_concatenation():
    rng = np.random.default_rng(12)
    parts = [rng.standard_normal((n, 5)) * 3 + 1000 for n in (7, 1, 30, 2)]
    moms = [_stages.moments(p) for p in parts]
    empty = _stages.Moments(0, np.zeros(5), np.zeros(5))
    merged = _stages.merge_moments([empty, moms[0], empty, *moms[1:]])
    whole = np.concatenate(parts)
    assert merged.count == whole.shape[0]
    np.testing.assert_allclose(merged.mean, whole.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.m2, ((whole - whole.mean(axis=0)) ** 2).sum(axis=0),
                               rtol=1e-11)
    one = _stages.merge_moments([moms[0], empty])
    _same(one.mean, moms[0].mean)
    _same(one.m2, moms[0].m2)


def test_global_sums_give_the_global_backward():
    """The element pass with sums and count of a larger batch equals the backward of that
    batch restricted to the local part (what SyncBatchNorm computes)."""
    x = _data((12, 3, 20), np.float64, 13)
    dy = _data((12, 3, 20), np.float64, 14)
    w = _data(3, np.float64, 15)
    _, mean, inv = cbn.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5)
    gx_ref = batch_norm_backward_ref(dy, x, w, mean, inv, True)[0]
    s = [_stages.backward_reduce(dy[i:i + 4], x[i:i + 4], mean) for i in (0, 4, 8)]
    s1 = sum(a for a, _ in s)
    s2 = sum(b for _, b in s)
    local = _stages.backward_elements(dy[4:8], x[4:8], w, mean, inv, s1, s2, 12 * 20)
    np.testing.assert_allclose(local, gx_ref[4:8], rtol=1e-10, atol=1e-12)


def test_forward_against_the_reference():
    x = _data((5, 4, 33), np.float32, 16, offset=3.0)
    mom = _stages.moments(x)
    st = _stages.finish(mom, 1e-5, dtype=np.float32)
    y = _stages.normalize(x, st)
    y_ref = batch_norm_forward_ref(x.astype(np.float64), None, None, None, None, True,
                                   0.1, 1e-5)[0]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
