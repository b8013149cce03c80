"""Training statistics at the edge of the floating-point range, against an exact oracle.

Finite inputs whose squared deviations overflow (float64 |x| ~ 1e200, float32 ~ 1e20) or
whose variance underflows (eps = 0) must give finite outputs and save_invstd wherever the
exact values are representable; channels holding inf or NaN must give what IEEE arithmetic
on the exact formula gives (mean +inf/-inf/NaN, invstd and output NaN). The float64
reference of cbn._reference overflows here too, so the oracle is exact decimal arithmetic
on the input's values (60 digits, no exponent limit), rounded once at the end.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

import numpy as np
import pytest

import cbn

MOMENTUM = 0.1


def _exact(x, axis, weight, bias, rm0, rv0, eps, residual=None, relu=False):
    """(y, mean, invstd, running_mean, running_var) of a training forward, computed exactly
    per channel on the values of x, then rounded to float64 (inf where not representable)."""
    xm = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    C = xm.shape[-1]
    flat = xm.reshape(-1, C)
    rm_ = np.moveaxis(np.asarray(residual, np.float64), axis, -1).reshape(-1, C) \
        if residual is not None else None
    n = flat.shape[0]
    y = np.empty_like(flat)
    mean, invstd, rm, rv = (np.empty(C) for _ in range(4))
    ctx = decimal.Context(prec=60, Emax=10 ** 6, Emin=-10 ** 6)
    with decimal.localcontext(ctx):
        for c in range(C):
            col = flat[:, c]
            if not np.isfinite(col).all():
                pos, neg = (col == np.inf).any(), (col == -np.inf).any()
                m = np.nan if np.isnan(col).any() or (pos and neg) else (
                    np.inf if pos else -np.inf)
                mean[c], invstd[c], y[:, c] = m, np.nan, np.nan
                rm[c] = MOMENTUM * m + (1 - MOMENTUM) * float(rm0[c])
                rv[c] = np.nan
                continue
            D = [Decimal(float(v)) for v in col]
            mu = sum(D) / n
            var = sum((d - mu) ** 2 for d in D) / n
            den = (var + Decimal(eps)).sqrt()
            inv = 1 / den if den != 0 else Decimal(0)
            w = Decimal(float(weight[c])) if weight is not None else Decimal(1)
            b = Decimal(float(bias[c])) if bias is not None else Decimal(0)
            for i, d in enumerate(D):
                v = float((d - mu) * inv * w + b)
                if rm_ is not None:
                    v += rm_[i, c]
                y[i, c] = 0.0 if relu and v < 0 else v
            mean[c], invstd[c] = float(mu), float(inv)
            m = Decimal(MOMENTUM)
            rm[c] = float(m * mu + (1 - m) * Decimal(float(rm0[c])))
            rv[c] = float(m * var * n / (n - 1) + (1 - m) * Decimal(float(rv0[c])))
    y = np.moveaxis(y.reshape(xm.shape), -1, axis)
    return y, mean, invstd, rm, rv


def _check(x, axis=1, eps=1e-5, affine=True, residual=None, relu=False, layout="plain",
           rtol=None):
    dtype = x.dtype
    C = x.shape[axis]
    rng = np.random.default_rng(7)
    w = rng.uniform(0.5, 2.0, C).astype(dtype) if affine else None
    b = rng.uniform(-1.0, 1.0, C).astype(dtype) if affine else None
    rm = rng.uniform(-1.0, 1.0, C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    want = _exact(x, axis, w, b, rm, rv, eps, residual, relu)
    xin = x if layout == "plain" else np.asfortranarray(x)
    y, sm, si = cbn.batch_norm_forward(xin, w, b, rm, rv, True, MOMENTUM, eps, axis=axis,
                                       residual=residual,
                                       activation="relu" if relu else None)
    if rtol is None:
        rtol = 1e-12 if dtype == np.float64 else 2e-6
    names = ("y", "save_mean", "save_invstd", "running_mean", "running_var")
    for name, got, exp in zip(names, (y, sm, si, rm, rv), want):
        with np.errstate(over="ignore"):
            exp = exp.astype(dtype)                  # inf where not representable
        np.testing.assert_array_equal(np.isnan(got), np.isnan(exp), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(exp), err_msg=name)
        fin = np.isfinite(exp)
        # y near 0 comes from a difference of O(1) terms: absolute tolerance there
        atol = 8 * rtol if name == "y" else 0.0
        np.testing.assert_allclose(got[fin], exp[fin], rtol=rtol, atol=atol, err_msg=name)
    return y, sm, si


SHAPES = [((6, 3, 10), 1), ((6, 10, 3), -1), ((40, 3), 1), ((2, 3, 4100), 1)]
SHAPE_IDS = ["nchw", "nhwc", "2d", "planes"]


@pytest.mark.parametrize("layout", ["plain", "general"])
@pytest.mark.parametrize("shape, axis", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, scale", [(np.float64, 1e200), (np.float64, 1e300),
                                          (np.float64, 1e307), (np.float32, 1e20),
                                          (np.float32, 1e37)])
def test_huge_finite_values_give_finite_outputs(dtype, scale, shape, axis, layout):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    y, sm, si = _check(x, axis, layout=layout)
    assert np.isfinite(y).all() and np.isfinite(si).all() and (si > 0).all()


def test_values_at_the_largest_float():
    # mean of +-1.7e308: the sum and every deviation overflow; all results are O(1) or
    # representable
    fmax = np.finfo(np.float64).max
    x = np.array([[fmax, -fmax, fmax * 0.5], [-fmax * 0.25, fmax, -fmax]]).T.copy()
    y, _, si = _check(x)
    assert np.isfinite(y).all() and np.isfinite(si).all()


@pytest.mark.parametrize("relu", [False, True])
def test_residual_and_relu_on_rescued_channels(relu):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 12)) * 1e250
    r = rng.standard_normal((8, 3, 12))
    _check(x, residual=r, relu=relu)


@pytest.mark.parametrize("dtype, tiny", [(np.float32, 1e-30), (np.float64, 1e-170)])
def test_variance_underflow_with_eps_zero(dtype, tiny):
    # the squares underflow: invstd was 0 (as for a constant channel) and y was the bias
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 3, 10)) * tiny).astype(dtype)
    y, _, si = _check(x, eps=0.0)
    assert (si > 0).all() and np.isfinite(y).all()


def test_other_channels_keep_their_bits():
    # only the rescued channel is rewritten: the others are exactly what the kernel gives
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 5, 9))
    w, b = rng.uniform(0.5, 2, 5), rng.uniform(-1, 1, 5)
    y0, sm0, si0 = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    x[:, 2] *= 1e250
    y1, sm1, si1 = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    keep = [0, 1, 3, 4]
    assert np.array_equal(y1[:, keep], y0[:, keep])
    assert np.array_equal(sm1[keep], sm0[keep]) and np.array_equal(si1[keep], si0[keep])
    assert np.isfinite(y1).all()


def test_constant_channel_with_eps_zero_is_unchanged():
    # invstd 0 by the documented convention, output exactly the bias: not "rescued"
    x = np.full((4, 2, 5), 3.0)
    x[:, 1] = np.arange(20.0).reshape(4, 5)
    b = np.array([0.5, -0.5])
    y, sm, si = cbn.batch_norm_forward(x, None, b, None, None, True, 0.1, 0.0)
    assert si[0] == 0.0 and sm[0] == 3.0
    assert (y[:, 0] == 0.5).all()


@pytest.mark.parametrize("layout", ["plain", "general"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_non_finite_inputs_propagate_like_the_exact_formula(shape, axis, dtype, layout):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    xm = np.moveaxis(x, axis, -1)                     # a view: writes go to x
    xm[..., 0].flat[3] = np.inf                       # channel 0: +inf -> mean +inf
    xm[..., 1].flat[0] = -np.inf                      # channel 1: -inf -> mean -inf
    if x.shape[axis] > 3:
        xm[..., 2].flat[1] = np.inf                   # channel 2: both -> NaN
        xm[..., 2].flat[2] = -np.inf
        xm[..., 3].flat[4] = np.nan                   # channel 3: NaN -> NaN
    y, sm, si = _check(x, axis, layout=layout, rtol=1e-12 if dtype == np.float64 else 1e-5)
    assert sm[0] == np.inf and sm[1] == -np.inf


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_rescue_is_the_same_for_any_thread_count(n_threads):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 4, 4100)) * 1e200
    x[:, 1] /= 1e200
    ref = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, n_threads=1)
    got = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5,
                                 n_threads=n_threads)
    for a, b in zip(got, ref):
        assert np.array_equal(a, b)


def test_half_precision_input_is_rescued():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((8, 3, 10)) * 1e30).astype(ml_dtypes.bfloat16)
    y, sm, si = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    want = _exact(x.astype(np.float64), 1, None, None, np.zeros(3), np.ones(3), 1e-5)
    np.testing.assert_allclose(si, want[2], rtol=1e-6)
    np.testing.assert_allclose(y.astype(np.float64), want[0], rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [0.0, np.nan, -np.nan, np.inf, -1.0])
@pytest.mark.parametrize("C", [1, 7, 64, 1000])
def test_suspect_statistics_are_never_missed(C, bad, dtype):
    # the gate in front of the rescue reads one byte per value: no false negatives
    from cbn._kernels import suspect as _suspect
    rng = np.random.default_rng(C)
    ok = np.exp(rng.uniform(-80, 80, C)).astype(dtype)   # 1e-35 .. 1e35: ordinary
    assert not _suspect(ok)
    for i in {0, C // 2, C - 1}:
        v = ok.copy()
        v[i] = bad
        assert _suspect(v)
