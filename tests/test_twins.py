"""Every fast public function against its slow twin in cbn._reference, over one array zoo.

As bottleneck does: one list of arrays (shapes 2D to 5D that reach both kernel shapes,
channels first and last, contiguous, Fortran, sliced, negative and permuted strides; float16,
bfloat16 where ml_dtypes is installed, float32, float64) and one walk of every function that
computes on arrays (the fused calls, the eval parameters and the normalize pass, and each
stage) against the float64 NumPy twin with the same signature (see cbn/_reference.py). The
activations and the residual go through every function that takes them. Bounds are those of
tests/conftest.py: a few units of the output dtype's roundoff, scaled with sqrt(n).
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn import _reference as ref
from cbn import _stages
from cbn.functional import eval_parameters, normalize
from conftest import (assert_close, assert_close_sums, forward_scale, grad_input_scale,
                      layout, make_input, make_params, n_per_channel)

try:
    import ml_dtypes
except ImportError:                                  # bfloat16 rows skip
    ml_dtypes = None

# (shape, channel axis, layout): planes (K >= 16), short planes, rows (K == 1), glued rows,
# a middle channel axis, each in a few memory layouts (tests/conftest.py's strided_variants).
ZOO = [
    ((4, 6, 40), 1, "C"), ((4, 6, 40), 1, "F"), ((4, 6, 40), 1, "sliced"),
    ((3, 5, 7, 9), 1, "channels_last"), ((3, 5, 7, 9), 1, "reversed"),
    ((64, 12), 1, "C"), ((64, 12), 1, "negative"),
    ((8, 5, 5, 12), -1, "C"), ((8, 5, 5, 12), -1, "sliced_outer"),
    ((2, 3, 17), 1, "rolled"), ((3, 4, 5, 6), 2, "C"),
    ((2, 4, 3, 4, 5), 1, "C"), ((2, 3, 4, 3, 5), -1, "F"),
]
ZOO_IDS = ["x".join(map(str, s)) + f"-ax{a}-{lay}" for s, a, lay in ZOO]

DTYPES = [np.float16, "bfloat16", np.float32, np.float64]
ACTIVATIONS = [None, *ref.ACTIVATIONS]
#: the activations whose backward reads the derivative off the forward's output (silu and
#: hardswish recompute the pre-activation from the forward's bias and residual)
FROM_OUTPUT = ("relu", "relu6", "leaky_relu")
SLOPE = 0.1                    # leaky_relu's negative_slope (YOLO's; torch's default is 0.01)


def _dtype(name):
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _compute(dtype):
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _tol_dtype(dtype):
    """The dtype whose roundoff bounds a result stored in ``dtype``."""
    if ml_dtypes is not None and dtype == np.dtype(ml_dtypes.bfloat16):
        return np.dtype(np.float16)      # finfo: bfloat16 has 8 bits of mantissa; see below
    return dtype


def _assert_close(actual, expected, dtype, n, **kw):
    """conftest's bound; bfloat16 (eps 2^-7) gets float16's bound (eps 2^-10) times 8."""
    if ml_dtypes is not None and np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        kw["factor"] = kw.get("factor", 1.0) * 8
    assert_close(actual, expected, _tol_dtype(np.dtype(dtype)), n, **kw)


def _zoo(shape, axis, lay, dtype, seed=0):
    """The input in the zoo's layout, and its values as float64 for the twin."""
    x = make_input(shape, axis, np.float64, seed).astype(dtype)
    return layout(x, lay), x.astype(np.float64)


def _act_kwargs(activation):
    kw = {"activation": activation}
    if activation == "leaky_relu":
        kw["negative_slope"] = SLOPE
    return kw


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name if d != "bfloat16" else d)
def dtype(request):
    return _dtype(request.param)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: f"act={a}")
@pytest.mark.parametrize("shape,axis,lay", ZOO, ids=ZOO_IDS)
def test_forward_and_batch_norm(shape, axis, lay, dtype, activation):
    x, x64 = _zoo(shape, axis, lay, dtype)
    C = shape[axis]
    n = n_per_channel(shape, axis)
    cd = _compute(dtype)
    w, b, rm, rv = make_params(C, cd)
    res, res64 = _zoo(shape, axis, "C", dtype, seed=7)
    kw = _act_kwargs(activation)
    for training, unbiased in ((True, True), (True, False), (False, True)):
        for residual in (None, res):
            msg = (f"training={training} unbiased={unbiased} "
                   f"residual={residual is not None}")
            rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
            y, sm, si = cbn.batch_norm_forward(x, w, b, rm1, rv1, training, 0.1, 1e-5,
                                               axis=axis, residual=residual,
                                               unbiased=unbiased, **kw)
            ey, esm, esi = ref.batch_norm_forward(
                x64, w, b, rm2, rv2, training, 0.1, 1e-5, axis=axis,
                residual=None if residual is None else res64, unbiased=unbiased, **kw)
            assert y.dtype == dtype and y.shape == shape, msg
            assert sm.dtype == si.dtype == cd, msg
            scale = forward_scale(x64, axis, esi, w, b) + (0 if residual is None
                                                           else np.abs(res64).max())
            _assert_close(y, ey, dtype, n, scale=scale, factor=2, err_msg=msg)
            _assert_close(sm, esm, cd, n, err_msg=msg)
            _assert_close(si, esi, cd, n, err_msg=msg)
            _assert_close(rm1, rm2, cd, n, err_msg=msg)
            _assert_close(rv1, rv2, cd, n, err_msg=msg)
            # batch_norm is the same forward, returning the output only
            y2 = cbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training, 0.1, 1e-5,
                                axis=axis, residual=residual, unbiased=unbiased, **kw)
            np.testing.assert_array_equal(np.asarray(y2, np.float64),
                                          np.asarray(y, np.float64), err_msg=msg)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: f"act={a}")
@pytest.mark.parametrize("shape,axis,lay", ZOO, ids=ZOO_IDS)
def test_backward(shape, axis, lay, dtype, activation):
    x, x64 = _zoo(shape, axis, lay, dtype)
    C = shape[axis]
    n = n_per_channel(shape, axis)
    cd = _compute(dtype)
    w, b, rm, rv = make_params(C, cd)
    g, g64 = _zoo(shape, axis, "F", dtype, seed=3)
    res, res64 = _zoo(shape, axis, "C", dtype, seed=7)
    kw = _act_kwargs(activation)
    for training in (True, False):
        for residual in (None, res):
            msg = f"training={training} residual={residual is not None}"
            y, sm, si = cbn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training, 0.1,
                                               1e-5, axis=axis, residual=residual, **kw)
            with_res = residual is not None
            if activation in FROM_OUTPUT:
                # the derivative is read off the forward's output, for both
                extra = {"output": y, "residual": with_res}
                twin = {"output": y}
            else:
                # recomputed from the forward's bias and residual; the twin is told the
                # pre-activation z = bn(x) + residual, from the definitions
                extra = {"bias": b, "residual": residual if with_res else False}
                twin = {"preactivation": ref.batch_norm_forward(
                    x64, w, b, rm.copy(), rv.copy(), training, 0.1, 1e-5, axis=axis,
                    residual=None if residual is None else res64)[0]}
            got = cbn.batch_norm_backward(g, x, w, sm, si, training, axis=axis, **kw, **extra)
            want = ref.batch_norm_backward(g64, x64, w, sm, si, training, axis=axis,
                                           residual=with_res, **kw, **twin)
            assert len(got) == len(want) == 3 + with_res, msg
            assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == cd, msg
            xhat = (np.moveaxis(x64, axis, -1) - sm.astype(np.float64)) * si
            dz = np.moveaxis(want[-1] if with_res else g64, axis, -1)
            _assert_close(got[0], want[0], dtype, n, factor=2, err_msg=msg,
                          scale=grad_input_scale(w, si, g64, xhat))
            assert_close_sums(got[1], want[1], np.moveaxis(dz * xhat, -1, axis), axis,
                              _tol_dtype(cd), factor=2, err_msg=msg + " grad_weight")
            assert_close_sums(got[2], want[2], np.moveaxis(dz, -1, axis), axis,
                              _tol_dtype(cd), factor=2, err_msg=msg + " grad_bias")
            if with_res:
                assert got[3].dtype == dtype
                _assert_close(got[3], want[3], dtype, n, err_msg=msg + " grad_residual")


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: f"act={a}")
@pytest.mark.parametrize("shape,axis,lay", ZOO, ids=ZOO_IDS)
def test_eval_parameters_and_normalize(shape, axis, lay, dtype, activation):
    x, x64 = _zoo(shape, axis, lay, dtype)
    C = shape[axis]
    cd = _compute(dtype)
    w, b, rm, rv = make_params(C, cd)
    params = eval_parameters(w, b, rv, 1e-5, cd)
    for got, want in zip(params, ref.eval_parameters(w, b, rv, 1e-5, cd)):
        assert got.dtype == cd
        _assert_close(got, want, cd, 1)
    _, scale, shift = params
    res, res64 = _zoo(shape, axis, "C", dtype, seed=7)
    kw = _act_kwargs(activation)
    for residual in (None, res):
        y = normalize(x, rm, scale, shift, axis=axis, residual=residual, **kw)
        ey = ref.normalize(x64, rm, scale, shift, axis=axis,
                           residual=None if residual is None else res64, **kw)
        assert y.dtype == dtype and y.shape == shape
        sc = np.abs(scale).max() * (np.abs(x64).max() + np.abs(rm).max()) + np.abs(shift).max()
        _assert_close(y, ey, dtype, 1, scale=sc + (0 if residual is None else np.abs(res64).max()),
                      factor=2, err_msg=f"residual={residual is not None}")


@pytest.mark.parametrize("shape,axis,lay", ZOO, ids=ZOO_IDS)
def test_forward_stages(shape, axis, lay, dtype):
    x, x64 = _zoo(shape, axis, lay, dtype)
    C = shape[axis]
    n = n_per_channel(shape, axis)
    cd = _compute(dtype)
    w, b, rm, rv = make_params(C, cd)
    sd = cd          # moments are float64 arrays accumulated from values of the compute dtype
    mom = _stages.moments(x, axis=axis)
    count, mean, m2 = ref.moments(x64, axis=axis)
    assert mom.count == count and mom.mean.dtype == mom.m2.dtype == np.float64
    _assert_close(mom.mean, mean, sd, n)
    _assert_close(mom.m2, m2, sd, n)
    # two halves along the first axis merge into the whole
    half = shape[0] // 2
    sl = [slice(None)] * len(shape)
    parts_fast, parts_ref = [], []
    for s in (slice(0, half), slice(half, None)):
        sl[0] = s
        parts_fast.append(_stages.moments(x[tuple(sl)], axis=axis))
        parts_ref.append(ref.moments(x64[tuple(sl)], axis=axis))
    merged = _stages.merge_moments(parts_fast)
    want = ref.merge_moments(parts_ref)
    assert merged.count == want[0] == count
    _assert_close(merged.mean, want[1], sd, n)
    _assert_close(merged.m2, want[2], sd, n)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    stats = _stages.finish(mom, 1e-5, dtype=cd, weight=w, bias=b, running_mean=rm1,
                           running_var=rv1, momentum=0.1)
    for got, exp in zip(stats, ref.finish((count, mean, m2), 1e-5, dtype=cd, weight=w,
                                          bias=b, running_mean=rm2, running_var=rv2,
                                          momentum=0.1)):
        assert got.dtype == cd
        _assert_close(got, exp, cd, n)
    _assert_close(rm1, rm2, cd, n)
    _assert_close(rv1, rv2, cd, n)


# the stages (what SyncBatchNorm composes) take the activations read off the output
@pytest.mark.parametrize("activation", [None, *FROM_OUTPUT], ids=lambda a: f"act={a}")
@pytest.mark.parametrize("shape,axis,lay", ZOO, ids=ZOO_IDS)
def test_backward_stages(shape, axis, lay, dtype, activation):
    x, x64 = _zoo(shape, axis, lay, dtype)
    C = shape[axis]
    n = n_per_channel(shape, axis)
    cd = _compute(dtype)
    w, b, rm, rv = make_params(C, cd)
    g, g64 = _zoo(shape, axis, "F", dtype, seed=3)
    kw = _act_kwargs(activation)
    y, sm, si = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5, axis=axis, **kw)
    extra = {} if activation is None else {"output": y}
    sum_dy, sum_dy_xmu = _stages.backward_reduce(g, x, sm, axis=axis, **kw, **extra)
    esum_dy, esum_dy_xmu = ref.backward_reduce(g64, x64, sm, axis=axis, **kw, **extra)
    dz = ref._masked(np.moveaxis(g64, axis, -1), activation, SLOPE, None, y, axis)
    xmu = np.moveaxis(x64, axis, -1) - sm.astype(np.float64)
    assert_close_sums(sum_dy, esum_dy, np.moveaxis(dz, -1, axis), axis, np.float32,
                      err_msg="sum_dy")
    assert_close_sums(sum_dy_xmu, esum_dy_xmu, np.moveaxis(dz * xmu, -1, axis), axis,
                      np.float32, err_msg="sum_dy_xmu")
    dx = _stages.backward_elements(g, x, w, sm, si, sum_dy, sum_dy_xmu, n, axis=axis,
                                   **kw, **extra)
    edx = ref.backward_elements(g64, x64, w, sm, si, sum_dy, sum_dy_xmu, n, axis=axis,
                                **kw, **extra)
    assert dx.dtype == dtype
    xhat = xmu * si
    _assert_close(dx, edx, dtype, n, factor=2, scale=grad_input_scale(w, si, g64, xhat))
    gw, gb = _stages.parameter_grads(sum_dy, sum_dy_xmu, si, cd)
    egw, egb = ref.parameter_grads(sum_dy, sum_dy_xmu, si, cd)
    _assert_close(gw, egw, cd, 1)
    _assert_close(gb, egb, cd, 1)
