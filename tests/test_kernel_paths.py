"""Every loop shape of the kernels against the float64 NumPy reference.

The kernels pick a loop by the shape of the (M, C, K) view (see cbn._kernels): planes
(K >= 16, with vector tails), and rows of W values, W = C*K or several m-rows glued
together: up to 8 vectors of 64 bytes (registers), wider multiples of the vector (walked
in memory order), widths that are no multiple of it (the general column loops), and a tail
of m-rows that does not fill a glued row. The cases below reach each of them for float32
and float64, for the training and eval forward, the fused ReLU/residual forward and both
backward passes, on 1 and 2 threads (which must agree to the bit).
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn import _reference as ref

from conftest import (DTYPES, assert_close, assert_close_sums, channel_shape, forward_scale,
                      grad_input_scale, make_input, make_params, n_per_channel)

# (shape, axis, what it exercises)
PATHS = [
    ((96, 16), 1, "rows: glued rows of 8 vectors"),
    ((40, 3, 2), 1, "rows: K = 2, glued C*K = 6"),
    ((7, 5, 5, 64), -1, "rows: one row of 4 (f32) or 8 (f64) vectors"),
    ((50, 144), 1, "rows: 9 (f32) or 18 (f64) vectors, memory-order loops"),
    ((3, 4, 6, 256), -1, "rows: 16 or 32 vectors"),
    ((33, 1001), 1, "rows: width not a multiple of the vector (column loops)"),
    ((37, 7), 1, "rows: a tail of m-rows after the last glued row"),
    ((6, 5, 17), 1, "planes: K = 17, one value past the vectors"),
    ((4, 6, 14, 14), 1, "planes: K = 196, vector tails"),
    ((2, 3, 4100), 1, "planes: a plane longer than a statistics block"),
    ((3, 7, 30000), 1, "planes: work items straddle channels and batch entries"),
]
PATH_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a, _ in PATHS]


def _data(shape, axis, dtype):
    x = make_input(shape, axis, dtype)
    C = shape[axis]
    w, b, rm, rv = make_params(C, dtype)
    rng = np.random.default_rng(7)
    g = rng.standard_normal(shape).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    return x, w, b, rm, rv, g, r


def _run(x, w, b, rm, rv, g, r, axis, nt):
    """Everything the kernels compute for one input, on nt threads."""
    rm1, rv1 = rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm1, rv1, True, 0.1, 1e-5, axis=axis,
                                       n_threads=nt)
    ye = cbn.batch_norm(x, rm, rv, w, b, training=False, axis=axis, n_threads=nt)
    yf = cbn.batch_norm(x, None, None, w, b, training=True, axis=axis, n_threads=nt,
                        activation="relu", residual=r)
    gx, gw, gb = cbn.batch_norm_backward(g, x, w, sm, si, True, axis=axis, n_threads=nt)
    gxe, gwe, gbe = cbn.batch_norm_backward(g, x, w, rm, 1.0 / np.sqrt(rv + 1e-5), False,
                                            axis=axis, n_threads=nt)
    gxm, gwm, gbm, grm = cbn.batch_norm_backward(g, x, w, sm, si, True, axis=axis,
                                                 n_threads=nt, activation="relu",
                                                 output=yf, residual=True)
    return dict(y=y, sm=sm, si=si, rm=rm1, rv=rv1, ye=ye, yf=yf, gx=gx, gw=gw, gb=gb,
                gxe=gxe, gwe=gwe, gbe=gbe, gxm=gxm, gwm=gwm, gbm=gbm, grm=grm)


def _xhat(x, mean, invstd, axis):
    cs = channel_shape(x.ndim, axis)
    return ((x.astype(np.float64) - np.asarray(mean, np.float64).reshape(cs))
            * np.asarray(invstd, np.float64).reshape(cs))


def _check_backward(gx, gw, gb, dy, x, w, mean, invstd, training, axis, dtype, what):
    egx, egw, egb = ref.batch_norm_backward(dy, x, w, mean, invstd, training, axis=axis)
    n = n_per_channel(x.shape, axis)
    xhat = _xhat(x, mean, invstd, axis)
    assert_close(gx, egx, dtype, n, scale=grad_input_scale(w, invstd, dy, xhat),
                 err_msg=what + " grad_input")
    terms = np.abs(dy.astype(np.float64)) * (1.0 + np.abs(xhat))
    assert_close_sums(gw, egw, terms, axis, dtype, err_msg=what + " grad_weight")
    assert_close_sums(gb, egb, terms, axis, dtype, err_msg=what + " grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, what", PATHS, ids=PATH_IDS)
def test_kernel_path_matches_reference(shape, axis, what, dtype):
    x, w, b, rm, rv, g, r = _data(shape, axis, dtype)
    n = n_per_channel(shape, axis)
    got = _run(x, w, b, rm, rv, g, r, axis, 1)

    # training forward and the running statistics
    erm, erv = rm.copy(), rv.copy()
    ey, esm, esi = ref.batch_norm_forward(x, w, b, erm, erv, True, 0.1, 1e-5, axis=axis)
    assert_close(got["y"], ey, dtype, n, scale=forward_scale(x, axis, esi, w, b),
                 err_msg=what + " y")
    assert_close(got["sm"], esm, dtype, n,
                 scale=forward_scale(x, axis, np.ones(shape[axis])).ravel(),
                 err_msg=what + " mean")
    assert_close(got["si"], esi, dtype, n, err_msg=what + " invstd")
    assert_close(got["rm"], erm, dtype, n, err_msg=what + " running_mean")
    assert_close(got["rv"], erv, dtype, n, err_msg=what + " running_var")

    # eval forward
    eye, _, esie = ref.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5, axis=axis)
    assert_close(got["ye"], eye, dtype, n, scale=forward_scale(x, axis, esie, w, b),
                 err_msg=what + " eval y")

    # fused relu(bn(x) + r), and its masked backward
    eyf = np.maximum(ey.astype(np.float64) + r, 0.0)
    assert_close(got["yf"], eyf, dtype, n,
                 scale=forward_scale(x, axis, esi, w, b) + np.abs(r).max(),
                 err_msg=what + " fused y")
    mask = got["yf"] > 0
    gmask = np.where(mask, g, 0).astype(dtype)
    np.testing.assert_array_equal(got["grm"], gmask)
    _check_backward(got["gxm"], got["gwm"], got["gbm"], gmask, x, w, got["sm"], got["si"],
                    True, axis, dtype, what + " masked")

    # training and eval backward
    _check_backward(got["gx"], got["gw"], got["gb"], g, x, w, got["sm"], got["si"], True,
                    axis, dtype, what + " train")
    _check_backward(got["gxe"], got["gwe"], got["gbe"], g, x, w, rm,
                    1.0 / np.sqrt(rv + 1e-5), False, axis, dtype, what + " eval")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, what", PATHS, ids=PATH_IDS)
def test_kernel_path_is_bit_identical_on_two_threads(shape, axis, what, dtype):
    # Large enough to run in parallel (small inputs stay on one thread whatever is asked).
    reps = -(-(1 << 16) // int(np.prod(shape)))
    big = (shape[0] * reps,) + tuple(shape[1:])
    x, w, b, rm, rv, g, r = _data(big, axis, dtype)
    one = _run(x, w, b, rm, rv, g, r, axis, 1)
    two = _run(x, w, b, rm, rv, g, r, axis, 2)
    for k in one:
        np.testing.assert_array_equal(two[k], one[k], err_msg=f"{what}: {k}")
