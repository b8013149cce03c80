"""Numerically hard inputs: large offsets, constant channels, extreme shapes.

Here size matters (>= 1e5 values per channel where the statistics are the point), so these
are the suite's largest arrays; each test still runs in well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn import _reference as ref

from conftest import (DTYPES, assert_close, assert_close_sums, channel_shape, channels_last,
                      forward_scale, grad_input_scale, make_input, make_params,
                      n_per_channel)


def _offset_data(shape, axis, mean=1e4, std=1.0, seed=0):
    """float32 values with a large common offset: mean 1e4, std 1 (condition ~1e4)."""
    rng = np.random.default_rng(seed)
    return (mean + std * rng.standard_normal(shape)).astype(np.float32)


# (name, shape, axis, make layout from a C-contiguous array of that shape)
OFFSET_LAYOUTS = [
    ("nchw", (4, 3, 160, 160), 1, lambda a: a),                 # planes: K = 25600
    ("nhwc", (4, 160, 160, 3), -1, lambda a: a),                # rows: K = 1
    ("channels_last", (4, 3, 160, 160), 1, channels_last),      # NCHW view, NHWC memory
    ("2d", (102400, 3), 1, lambda a: a),                        # (N, C)
    ("ncl_small_k", (12800, 3, 8), 1, lambda a: a),             # K = 8: small planes
]


@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("name, shape, axis, lay", OFFSET_LAYOUTS,
                         ids=[c[0] for c in OFFSET_LAYOUTS])
def test_large_offset_float32_statistics(name, shape, axis, lay, eps):
    x = lay(_offset_data(shape, axis))
    C = x.shape[axis]
    n = n_per_channel(x.shape, axis)
    assert n >= 100_000
    # ground truth: the same float32 values, in float64
    x64 = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, C)
    mean64 = x64.mean(axis=0)
    var64 = x64.var(axis=0)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, sm, si = cbn.batch_norm_forward(x, None, None, rm, rv, True, 1.0, eps, axis=axis)

    # variance from save_invstd (float64 arithmetic on the float32 result)
    var = 1.0 / si.astype(np.float64) ** 2 - eps
    np.testing.assert_allclose(var, var64, rtol=1e-4)
    # E[x^2] - E[x]^2 in float32 would be off by ~ eps32 * 1e8 = 10 here, not 1e-4
    # the mean is correct to the float32 rounding of the exact mean
    np.testing.assert_allclose(sm, mean64, rtol=2 * np.finfo(np.float32).eps)
    # momentum 1: the running stats are the batch mean and the unbiased variance
    np.testing.assert_allclose(rm, mean64, rtol=2 * np.finfo(np.float32).eps)
    np.testing.assert_allclose(rv.astype(np.float64), var64 * n / (n - 1), rtol=1e-4)

    # the output: exact normalization of these values, up to the unavoidable error of
    # subtracting a mean held in float32 (half an ulp of |mean| = eps32 * 1e4 / 2, scaled
    # by invstd ~ 1) plus conftest's bound for the rest
    cs = channel_shape(x.ndim, axis)
    y_exact = (x.astype(np.float64) - mean64.reshape(cs)) / np.sqrt(var64 + eps).reshape(cs)
    mean_ulp = float(np.finfo(np.float32).eps) * float(np.max(np.abs(mean64)))
    np.testing.assert_allclose(y, y_exact, rtol=0,
                               atol=2 * mean_ulp * float(np.max(si)) + 1e-5)
    assert abs(float(y.astype(np.float64).mean())) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis, lay", OFFSET_LAYOUTS[:3],
                         ids=[c[0] for c in OFFSET_LAYOUTS[:3]])
def test_large_offset_backward(name, shape, axis, lay, dtype):
    # training backward on the same hard data against the float64 reference
    x = lay(_offset_data(shape, axis)).astype(dtype)
    dy = lay(np.random.default_rng(1).standard_normal(shape).astype(dtype))
    _, sm, si = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, axis=axis)
    gx, gw, gb = cbn.batch_norm_backward(dy, x, None, sm, si, True, axis=axis)
    egx, egw, egb = ref.batch_norm_backward(dy, x, None, sm, si, True, axis=axis)
    n = n_per_channel(x.shape, axis)
    # with |x - mean| up to ~5 and a mean of 1e4 held in dtype, each xhat carries up to
    # eps * 1e4 * invstd of error; sums of n such terms up to sqrt(n) times that
    e = float(np.finfo(dtype).eps) * 1e4
    np.testing.assert_allclose(gx, egx, rtol=0, atol=8 * e * float(np.max(np.abs(dy))))
    np.testing.assert_allclose(gb, egb, rtol=0, atol=8 * float(np.finfo(dtype).eps) * n)
    np.testing.assert_allclose(gw, egw, rtol=0, atol=8 * e * np.sqrt(n) * 5)


CONST_LAYOUTS = [
    ("nchw_large_hw", (2, 3, 96, 96), 1, lambda a: a),
    ("nhwc", (2, 96, 96, 3), -1, lambda a: a),
    ("channels_last", (2, 3, 96, 96), 1, channels_last),
    ("2d", (5000, 3), 1, lambda a: a),
    ("ncl_odd_k", (37, 3, 7), 1, lambda a: a),
]


@pytest.mark.parametrize("value", [3.7, 1e4, -0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis, lay", CONST_LAYOUTS,
                         ids=[c[0] for c in CONST_LAYOUTS])
def test_constant_channel_gives_exact_zero(name, shape, axis, lay, dtype, value):
    # channel 1 constant, the others random: with weight 1 and bias 0 the constant channel
    # normalizes to exactly 0 (its mean is its value, its variance 0)
    x = make_input(shape, axis, dtype)
    np.moveaxis(x, axis, -1)[..., 1] = dtype(value)
    x = lay(x)
    C = x.shape[axis]
    w, b = np.ones(C, dtype), np.zeros(C, dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis=axis)
    yc = np.moveaxis(y, axis, -1)[..., 1]
    assert (yc == 0).all(), f"constant channel: max |y| = {np.max(np.abs(yc))}"
    assert sm[1] == dtype(value)
    assert rv[1] == dtype(0.9)          # (1 - 0.1) * 1 + 0.1 * 0, variance exactly 0
    # the other channels are normal (the oracle's own float64 mean of a constant channel
    # is not exact, so channel 1 is checked against the exact 0 above only)
    n = n_per_channel(x.shape, axis)
    ey = ref.batch_norm(np.ascontiguousarray(x), None, None, w, b, True, axis=axis)
    others = [0, 2]
    assert_close(np.moveaxis(y, axis, -1)[..., others], np.moveaxis(ey, axis, -1)[..., others],
                 dtype, n)
    # all channels constant, without weight / bias, eval-free path: still exactly 0
    xa = lay(np.full(shape, dtype(value), dtype))
    ya = cbn.batch_norm(xa, None, None, training=True, axis=axis)
    assert (ya == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [
    ((2, 3, 50000), 1),        # large K (planes)
    ((64, 8, 3), 1),           # small K
    ((200, 5, 2), 1),          # K = 2
    ((3, 2000), 1),            # large C, few rows
    ((2, 2000, 3), 1),         # large C with small K
    ((37, 11, 13, 3), -1),     # many rows channels-last, M = 1573 (not a nice number)
    ((37, 11, 13, 5), -1),
    ((1, 7, 129), 1),          # M = 1
    ((8193, 3), 1),            # rows just past a power of two
], ids=["large_k", "small_k", "k2", "large_c", "large_c_small_k", "many_rows_c3",
        "many_rows_c5", "m1", "rows_8193"])
def test_extreme_shapes_match_reference(shape, axis, dtype):
    x = make_input(shape, axis, dtype, seed=3)
    C, n = shape[axis], n_per_channel(shape, axis)
    w, b, rm, rv = make_params(C, dtype)
    erm, erv = rm.copy(), rv.copy()
    ey, esm, esi = ref.batch_norm_forward(x, w, b, erm, erv, True, 0.1, 1e-5, axis=axis)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis=axis)
    assert_close(y, ey, dtype, n, scale=forward_scale(x, axis, esi, w, b), err_msg="y")
    assert_close(sm, esm, dtype, n, scale=forward_scale(x, axis, np.ones(C)).ravel(),
                 err_msg="save_mean")
    assert_close(si, esi, dtype, n, err_msg="save_invstd")
    assert_close(rm, erm, dtype, n, err_msg="running_mean")
    assert_close(rv, erv, dtype, n, err_msg="running_var")
    ye = cbn.batch_norm(x, erm, erv, w, b, False, axis=axis)
    assert_close(ye, ref.batch_norm(x, erm, erv, w, b, False, axis=axis), dtype, 1)
    dy = make_input(shape, axis, dtype, seed=4)
    gx, gw, gb = cbn.batch_norm_backward(dy, x, w, sm, si, True, axis=axis)
    egx, egw, egb = ref.batch_norm_backward(dy, x, w, sm, si, True, axis=axis)
    cs = channel_shape(len(shape), axis)
    xhat = (x.astype(np.float64) - sm.astype(np.float64).reshape(cs)) * \
        si.astype(np.float64).reshape(cs)
    assert_close(gx, egx, dtype, n, scale=grad_input_scale(w, si, dy, xhat), err_msg="dx")
    terms = np.abs(dy.astype(np.float64)) * (1 + np.abs(xhat))
    assert_close_sums(gw, egw, terms, axis, dtype, err_msg="grad_weight")
    assert_close_sums(gb, egb, terms, axis, dtype, err_msg="grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_and_huge_scales(dtype):
    # normalization is scale-invariant: data scaled by 2^k gives the same y (up to
    # rounding) as long as nothing under/overflows in the statistics
    base = make_input((16, 3, 33), 1, np.float64, seed=9)
    n = n_per_channel(base.shape, 1)
    e = ref.batch_norm(base.astype(dtype), None, None, training=True, eps=0.0)
    fi = np.finfo(dtype)
    for k in (-int(np.log2(fi.max)) // 4, int(np.log2(fi.max)) // 4):
        x = (base * 2.0 ** k).astype(dtype)
        y = cbn.batch_norm(x, None, None, training=True, eps=0.0)
        assert_close(y, e, dtype, n, err_msg=f"scale 2^{k}")


# The statistics shift each block by the mean of its first values (rows kernels: of its
# first rows) and take a second, corrected pass where that estimate was far off: a channel
# sorted along the batch is the worst case (its first values are its smallest). In the
# rows kernels a few such channels take the per-channel pass, many the whole-block pass.
SORTED_CASES = [
    ((4096, 256), 1, "few"),        # wide rows, 2 of 256 channels sorted
    ((4096, 256), 1, "all"),
    ((8192, 64), 1, "few"),         # fixed-width rows, two lanes per channel
    ((8192, 64), 1, "all"),
    ((4096, 5, 4), 1, "few"),       # K = 4: rows of C*K values
    ((4096, 5, 4), 1, "all"),
    ((16, 4, 1024), 1, "few"),      # planes: the shift is the mean of a unit's first values
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, which", SORTED_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{w}" for s, _, w in SORTED_CASES])
def test_statistics_with_sorted_channels(shape, axis, which, dtype):
    rng = np.random.default_rng(5)
    x = (1e3 + rng.standard_normal(shape)).astype(dtype)
    C = shape[axis]
    sorted_channels = [1, C - 1] if which == "few" else list(range(C))
    for c in sorted_channels:
        xc = np.take(x, c, axis=axis)
        flat = np.sort(xc.reshape(-1))     # the batch in increasing order
        idx = [slice(None)] * x.ndim
        idx[axis] = c
        x[tuple(idx)] = flat.reshape(xc.shape)
    x64 = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, C)
    y, sm, si = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 0.0,
                                       axis=axis)
    var = 1.0 / si.astype(np.float64) ** 2
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=2e-4 if dtype == np.float32
                               else 1e-10)
    n = n_per_channel(shape, axis)
    assert_close(sm, x64.mean(axis=0), dtype, n,
                 scale=forward_scale(x, axis, np.ones(C)).ravel(), err_msg="mean")
    e = ref.batch_norm(x, None, None, training=True, eps=0.0, axis=axis)
    assert_close(y, e, dtype, n, scale=forward_scale(x, axis, si), err_msg="y")
