"""Arrays whose data is not aligned to their element size (np.frombuffer at an odd offset)
reach the C loops only as aligned copies: a misaligned element access is undefined
behaviour in C (UBSan reports it). Results are the aligned call's, bit for bit, and
arrays updated in place (running statistics, out=) are still updated."""

import numpy as np
import pytest

import cbn


def _misaligned(a):
    """A copy of ``a`` whose data starts one byte past an element boundary."""
    a = np.ascontiguousarray(a)
    buf = np.zeros(a.nbytes + 1, np.uint8)
    m = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((6, 5, 20), 1), ((40, 7), 1), ((3, 4, 4, 6), -1)])
def test_misaligned_arrays_give_the_aligned_results(shape, axis, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    want = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis=axis)
    mrm, mrv, out = _misaligned(np.zeros(C, dtype)), _misaligned(np.ones(C, dtype)), \
        _misaligned(np.zeros(shape, dtype))
    got = cbn.batch_norm_forward(_misaligned(x), _misaligned(w), _misaligned(b), mrm, mrv,
                                 True, 0.1, 1e-5, axis=axis, out=out)
    assert got[0] is out
    for a, c in zip(got, want):
        assert a.tobytes() == c.tobytes()
    assert mrm.tobytes() == rm.tobytes() and mrv.tobytes() == rv.tobytes()
    g = rng.standard_normal(shape).astype(dtype)
    want_b = cbn.batch_norm_backward(g, x, w, want[1], want[2], True, axis=axis)
    got_b = cbn.batch_norm_backward(_misaligned(g), _misaligned(x), _misaligned(w),
                                    _misaligned(want[1]), _misaligned(want[2]), True,
                                    axis=axis)
    for a, c in zip(got_b, want_b):
        assert a.tobytes() == c.tobytes()
