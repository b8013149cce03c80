"""Parity with PyTorch's CPU batch norm (ATen's native_batch_norm and its backward, and
torch.nn.functional.batch_norm), on the same values and layouts.

Both sides are inexact, so the bounds are conftest's dtype-derived ones with factor=2
(the sum of two implementations' errors).
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn

from conftest import (DTYPES, assert_close, assert_close_sums, channel_shape, grad_input_scale,
                      make_input, make_params, n_per_channel)

torch = pytest.importorskip("torch")
F = torch.nn.functional

MOMENTUM = 0.1
EPS = 1e-5

SHAPES = [(8, 3), (4, 3, 10), (3, 4, 5, 6), (2, 3, 4, 5, 3)]
SHAPE_IDS = ["2d", "3d", "4d", "5d"]
KINDS = ["nchw", "channels_last", "nhwc"]


def _valid(shape, kind):
    """torch memory formats exist for 4D/5D only; in 2D channels-last is the plain layout."""
    return {"nchw": True, "channels_last": len(shape) in (4, 5), "nhwc": len(shape) > 2}[kind]


SHAPE_KINDS = [pytest.param(shape, kind, id=f"{sid}-{kind}")
               for shape, sid in zip(SHAPES, SHAPE_IDS) for kind in KINDS if _valid(shape, kind)]


def _t(a):
    return None if a is None else torch.from_numpy(np.array(a, copy=True))


def _layout(x_nchw, kind):
    """(cbn input, cbn axis, torch input, to_nchw) for one layout of the NCHW values.

    ``nchw``: contiguous, axis 1. ``channels_last``: torch.channels_last(_3d) memory
    format, the same memory handed to cbn with axis 1. ``nhwc``: a contiguous
    channels-last array for cbn with axis -1, and the same memory viewed as NCHW for torch.
    ``to_nchw`` maps a cbn output (input-shaped) back to NCHW axis order.
    """
    ndim = x_nchw.ndim
    if kind == "nchw":
        xt = torch.from_numpy(np.ascontiguousarray(x_nchw))
        return xt.numpy(), 1, xt, lambda a: a
    assert _valid(x_nchw.shape, kind)
    if kind == "channels_last":
        fmt = torch.channels_last if ndim == 4 else torch.channels_last_3d
        xt = torch.from_numpy(np.ascontiguousarray(x_nchw)).contiguous(memory_format=fmt)
        x = xt.numpy()                      # same memory, channels_last strides
        assert not x.flags.c_contiguous and np.moveaxis(x, 1, -1).flags.c_contiguous
        return x, 1, xt, lambda a: a
    if kind == "nhwc":
        x = np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1))
        xt = torch.from_numpy(x).movedim(-1, 1)
        return x, -1, xt, lambda a: np.moveaxis(a, -1, 1)
    raise AssertionError(kind)


def _grad_checks(gx, gw, gb, tgx, tgw, tgb, x, dy, w, sm, si, dtype):
    """cbn's grads (NCHW order) against torch's, with conftest's bounds (factor 2)."""
    cs = channel_shape(x.ndim, 1)
    xhat = (x.astype(np.float64) - sm.astype(np.float64).reshape(cs)) * \
        si.astype(np.float64).reshape(cs)
    n = n_per_channel(x.shape, 1)
    assert_close(gx, tgx, dtype, n, scale=grad_input_scale(w, si, dy, xhat), factor=2,
                 err_msg="grad_input")
    terms = np.abs(dy.astype(np.float64)) * (1 + np.abs(xhat))
    assert_close_sums(gw, tgw, terms, 1, dtype, factor=2, err_msg="grad_weight")
    assert_close_sums(gb, tgb, terms, 1, dtype, factor=2, err_msg="grad_bias")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kind", SHAPE_KINDS)
def test_native_batch_norm_parity(shape, dtype, kind, training, affine):
    x_nchw = make_input(shape, 1, dtype, seed=31)
    dy_nchw = make_input(shape, 1, dtype, seed=32)
    C, n = shape[1], n_per_channel(shape, 1)
    w, b, rm, rv = make_params(C, dtype, seed=33)
    if not affine:
        w = b = None
    x, axis, xt, to_nchw = _layout(x_nchw, kind)
    dy, _, dyt, _ = _layout(dy_nchw, kind)

    # torch
    trm, trv = _t(rm), _t(rv)
    ty, tsm, tsi = torch.ops.aten.native_batch_norm(xt, _t(w), _t(b), trm, trv, training,
                                                    MOMENTUM, EPS)
    # cbn
    crm, crv = rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, w, b, crm, crv, training, MOMENTUM, EPS, axis=axis)

    assert_close(to_nchw(y), ty.numpy(), dtype, n, factor=2, err_msg="y")
    # the output keeps the input's memory layout, as torch's does
    if kind != "nhwc":
        assert y.strides == tuple(s * y.itemsize for s in ty.stride())
    else:
        assert y.flags.c_contiguous
    if training:
        assert_close(sm, tsm.numpy(), dtype, n, factor=2, err_msg="save_mean")
        assert_close(si, tsi.numpy(), dtype, n, factor=2, err_msg="save_invstd")
        assert_close(crm, trm.numpy(), dtype, n, factor=2, err_msg="running_mean")
        assert_close(crv, trv.numpy(), dtype, n, factor=2, err_msg="running_var")
    else:
        # torch returns empty save tensors in eval on CPU: cbn returns the running stats
        assert tsm.numel() == 0 and tsi.numel() == 0
        np.testing.assert_array_equal(sm, rm)
        assert_close(si, 1.0 / np.sqrt(rv.astype(np.float64) + EPS), dtype, 1)
        np.testing.assert_array_equal(crm, trm.numpy())       # neither updates them
        np.testing.assert_array_equal(crv, trv.numpy())

    # backward: in eval torch takes the running stats (and its empty save tensors)
    tgx, tgw, tgb = torch.ops.aten.native_batch_norm_backward(
        dyt, xt, _t(w), _t(rm), _t(rv), tsm, tsi, training, EPS, [True, True, True])
    gx, gw, gb = cbn.batch_norm_backward(dy, x, w, sm, si, training, axis=axis)
    _grad_checks(to_nchw(gx), gw, gb, tgx.numpy(), tgw.numpy(), tgb.numpy(), x_nchw,
                 dy_nchw, w, sm, si, dtype)
    if kind != "nhwc":
        assert gx.strides == tuple(s * gx.itemsize for s in tgx.stride())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kind", SHAPE_KINDS)
def test_functional_batch_norm_parity(shape, dtype, kind, training):
    x_nchw = make_input(shape, 1, dtype, seed=41)
    C, n = shape[1], n_per_channel(shape, 1)
    w, b, rm, rv = make_params(C, dtype, seed=42)
    x, axis, xt, to_nchw = _layout(x_nchw, kind)
    momentum, eps = 0.3, 1e-3
    trm, trv = _t(rm), _t(rv)
    ty = F.batch_norm(xt, trm, trv, _t(w), _t(b), training, momentum, eps)
    crm, crv = rm.copy(), rv.copy()
    # same positional arguments as torch.nn.functional.batch_norm
    y = cbn.batch_norm(x, crm, crv, w, b, training, momentum, eps, axis=axis)
    assert_close(to_nchw(y), ty.numpy(), dtype, n, factor=2)
    assert_close(crm, trm.numpy(), dtype, n, factor=2)
    assert_close(crv, trv.numpy(), dtype, n, factor=2)
    # keywords too, and the defaults (momentum 0.1, eps 1e-5, training False)
    ty = F.batch_norm(xt, _t(rm), _t(rv), weight=_t(w), bias=_t(b))
    y = cbn.batch_norm(x, rm.copy(), rv.copy(), weight=w, bias=b, axis=axis)
    assert_close(to_nchw(y), ty.numpy(), dtype, n, factor=2)
    ty = F.batch_norm(xt, _t(rm), _t(rv), training=True)
    y = cbn.batch_norm(x, rm.copy(), rv.copy(), training=True, axis=axis)
    assert_close(to_nchw(y), ty.numpy(), dtype, n, factor=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_parity(dtype, kind, training, bad):
    # where torch gives NaN / non-finite / finite values, so does cbn (y, saved and running
    # stats), and the finite values agree
    shape = (3, 4, 5, 6)
    x_nchw = make_input(shape, 1, dtype, seed=51)
    x_nchw[1, 2, 3, 4] = bad
    C, n = shape[1], n_per_channel(shape, 1)
    w, b, rm, rv = make_params(C, dtype, seed=52)
    x, axis, xt, to_nchw = _layout(x_nchw, kind)
    trm, trv = _t(rm), _t(rv)
    ty, tsm, tsi = torch.ops.aten.native_batch_norm(xt, _t(w), _t(b), trm, trv, training,
                                                    MOMENTUM, EPS)
    crm, crv = rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, w, b, crm, crv, training, MOMENTUM, EPS, axis=axis)
    y = to_nchw(y)
    pairs = [("y", y, ty.numpy()), ("running_mean", crm, trm.numpy()),
             ("running_var", crv, trv.numpy())]
    if training:
        pairs += [("save_mean", sm, tsm.numpy()), ("save_invstd", si, tsi.numpy())]
    for name, a, e in pairs:
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(e), err_msg=name)
        if "mean" not in name:
            # the mean of a channel holding +inf is inf (torch) or NaN (also acceptable);
            # everything derived from the variance must be NaN exactly where torch's is
            np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=name + " NaNs")
        fin = np.isfinite(e)
        assert_close(a[fin], e[fin], dtype, n, factor=2, err_msg=name)


def test_one_value_per_channel_raises_in_training_like_torch():
    x = np.zeros((1, 4), np.float32)
    with pytest.raises((ValueError, RuntimeError)):
        F.batch_norm(torch.from_numpy(x), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        cbn.batch_norm(x, None, None, training=True)
    # both accept it in eval
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    ty = F.batch_norm(torch.from_numpy(x), _t(rm), _t(rv), training=False)
    assert_close(cbn.batch_norm(x, rm, rv, training=False), ty.numpy(), np.float32, 1,
                 factor=2)
