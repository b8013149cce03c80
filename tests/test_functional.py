"""cbn.batch_norm / batch_norm_forward / batch_norm_backward against cbn._reference.

The reference computes everything in float64 from the definitions; each test feeds the
same values to both (cbn possibly through a strided view) and compares with the
dtype-derived tolerances of conftest.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn import _reference as ref

from conftest import (CASE_IDS, CASES, DTYPES, assert_close, assert_close_sums,
                      case_layouts,
                      channel_shape, channels_last, forward_scale, grad_input_scale,
                      is_dense_in_order,
                      layout, make_input, make_params, memory_order, n_per_channel,
                      read_only, strided_variants)

MOMENTUM = 0.1
EPS = 1e-5


def _copies(*arrays):
    return tuple(None if a is None else a.copy() for a in arrays)


def _reference_forward(x, w, b, rm, rv, training, momentum=MOMENTUM, eps=EPS, axis=1):
    """Reference forward on copies: (y, save_mean, save_invstd, rm_after, rv_after)."""
    rm, rv = _copies(rm, rv)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        y, sm, si = ref.batch_norm_forward(np.ascontiguousarray(x), w, b, rm, rv, training,
                                           momentum, eps, axis=axis)
    return y, sm, si, rm, rv


def _check_grads(gx, gw, gb, dy, x, w, sm, si, training, axis, dtype, msg=""):
    """cbn's gradients against the reference's, with the conftest bounds."""
    egx, egw, egb = ref.batch_norm_backward(np.asarray(dy), np.asarray(x), w, sm, si,
                                            training, axis=axis)
    n = n_per_channel(np.shape(x), axis)
    xhat = _xhat(x, sm, si, axis)
    assert_close(gx, egx, dtype, n, scale=grad_input_scale(w, si, dy, xhat),
                 err_msg=msg + " grad_input")
    terms = np.abs(np.asarray(dy, np.float64)) * (1.0 + np.abs(xhat))
    assert_close_sums(gw, egw, terms, axis, dtype, err_msg=msg + " grad_weight")
    assert_close_sums(gb, egb, terms, axis, dtype, err_msg=msg + " grad_bias")


def _xhat(x, save_mean, save_invstd, axis):
    cs = channel_shape(x.ndim, axis)
    return ((np.asarray(x, np.float64) - np.asarray(save_mean, np.float64).reshape(cs))
            * np.asarray(save_invstd, np.float64).reshape(cs))


# ------------------------------------------------------------------- forward vs reference


@pytest.mark.parametrize("mode", ["train", "train_no_running", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, lay", case_layouts())
def test_forward_matches_reference(case, lay, dtype, mode):
    shape, axis = case
    x0 = make_input(shape, axis, dtype)
    x = layout(x0, lay)
    C, n = shape[axis], n_per_channel(shape, axis)
    training = mode != "eval"
    for affine in (False, True):
        w, b, rm, rv = make_params(C, dtype)
        if not affine:
            w = b = None
        if mode == "train_no_running":
            rm = rv = None
        msg = f"affine={affine}"
        ey, esm, esi, erm, erv = _reference_forward(x0, w, b, rm, rv, training, axis=axis)

        x_before = x.copy()
        rm1, rv1 = _copies(rm, rv)
        y, sm, si = cbn.batch_norm_forward(x, w, b, rm1, rv1, training, MOMENTUM, EPS,
                                           axis=axis)

        assert y.shape == x.shape and y.dtype == dtype
        assert sm.shape == si.shape == (C,) and sm.dtype == si.dtype == dtype
        assert_close(y, ey, dtype, n, scale=forward_scale(x0, axis, esi, w, b),
                     err_msg=msg + " y")
        assert_close(sm, esm, dtype, n, scale=forward_scale(x0, axis, np.ones(C)).ravel(),
                     err_msg=msg + " save_mean")
        assert_close(si, esi, dtype, n, err_msg=msg + " save_invstd")
        if rm is not None:
            assert rm1.dtype == rv1.dtype == dtype
            assert_close(rm1, erm, dtype, n, err_msg=msg + " running_mean")
            assert_close(rv1, erv, dtype, n, err_msg=msg + " running_var")
            if not training:
                assert np.array_equal(rm1, rm) and np.array_equal(rv1, rv)
        np.testing.assert_array_equal(x, x_before)          # the input is not touched

        # batch_norm (torch.nn.functional argument order): same output and update.
        rm2, rv2 = _copies(rm, rv)
        y2 = cbn.batch_norm(x, rm2, rv2, w, b, training, MOMENTUM, EPS, axis=axis)
        np.testing.assert_array_equal(y2, y)
        if rm is not None:
            np.testing.assert_array_equal(rm2, rm1)
            np.testing.assert_array_equal(rv2, rv1)


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES[::3], ids=CASE_IDS[::3])
def test_forward_weight_only_or_bias_only(case, training, which):
    shape, axis = case
    dtype = np.float64
    x = make_input(shape, axis, dtype)
    C, n = shape[axis], n_per_channel(shape, axis)
    w, b, rm, rv = make_params(C, dtype)
    if which == "weight":
        b = None
    else:
        w = None
    ey, esm, esi, erm, erv = _reference_forward(x, w, b, rm, rv, training, axis=axis)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, training, MOMENTUM, EPS, axis=axis)
    assert_close(y, ey, dtype, n)
    assert_close(rm, erm, dtype, n)
    assert_close(rv, erv, dtype, n)


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((8, 3, 5), 1), ((8, 5, 3), -1)], ids=["ncl", "nlc"])
def test_running_stat_update(case, dtype, momentum):
    shape, axis = case
    x = make_input(shape, axis, dtype)
    C, n = shape[axis], n_per_channel(shape, axis)
    _, _, rm, rv = make_params(C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, None, None, rm, rv, True, momentum, EPS, axis=axis)
    # From the definition, in float64: biased var normalizes, unbiased var updates.
    xm = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, C)
    mean, var = xm.mean(axis=0), xm.var(axis=0)
    assert_close(rm, (1 - momentum) * rm0.astype(np.float64) + momentum * mean, dtype, n)
    assert_close(rv, (1 - momentum) * rv0.astype(np.float64) + momentum * var * n / (n - 1),
                 dtype, n)
    assert_close(sm, mean, dtype, n)
    assert_close(si, 1.0 / np.sqrt(var + EPS), dtype, n)
    if momentum == 0.0:
        # (1 - 0) * rm + 0 * mean is rm exactly
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_stats_eval_are_running_stats(dtype):
    shape, axis = (4, 3, 5), 1
    x = make_input(shape, axis, dtype)
    w, b, rm, rv = make_params(3, dtype)
    eps = 1e-3
    rm0, rv0 = rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, False, MOMENTUM, eps)
    np.testing.assert_array_equal(sm, rm0)          # the running mean itself (as a copy)
    assert sm is not rm and not np.shares_memory(sm, rm)
    assert_close(si, 1.0 / np.sqrt(rv0.astype(np.float64) + eps), dtype, 1)
    sm[...] = 123.0                                   # a copy: the running mean is unchanged
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_strided_views_are_updated(dtype):
    shape, axis = (6, 4, 5), 1
    x = make_input(shape, axis, dtype)
    _, _, rm, rv = make_params(4, dtype)
    erm, erv = rm.copy(), rv.copy()
    ref.batch_norm_forward(x, None, None, erm, erv, True, MOMENTUM, EPS)
    big_m = np.full(8, 7.0, dtype)
    big_v = np.full(12, 7.0, dtype)
    big_m[::2] = rm
    big_v[::-3] = rv
    vm, vv = big_m[::2], big_v[::-3]
    cbn.batch_norm(x, vm, vv, training=True, momentum=MOMENTUM, eps=EPS)
    n = n_per_channel(shape, axis)
    assert_close(big_m[::2], erm, dtype, n)
    assert_close(big_v[::-3], erv, dtype, n)
    # the elements in between are untouched
    np.testing.assert_array_equal(big_m[1::2], 7.0)
    mask = np.ones(12, bool)
    mask[::-3] = False
    np.testing.assert_array_equal(big_v[mask], 7.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_one_running_stat_in_training(dtype):
    shape, axis = (5, 3, 4), 1
    x = make_input(shape, axis, dtype)
    _, _, rm, rv = make_params(3, dtype)
    n = n_per_channel(shape, axis)
    _, _, _, erm, _ = _reference_forward(x, None, None, rm, rv, True)
    _, _, _, _, erv = _reference_forward(x, None, None, rm, rv, True)
    rm1 = rm.copy()
    cbn.batch_norm(x, rm1, None, training=True)
    assert_close(rm1, erm, dtype, n)
    rv1 = rv.copy()
    cbn.batch_norm(x, None, rv1, training=True)
    assert_close(rv1, erv, dtype, n)


def test_eval_with_one_value_per_channel_is_allowed():
    # PyTorch refuses (1, C) only in training: eval just applies the running stats.
    x = make_input((1, 4), 1, np.float64)
    w, b, rm, rv = make_params(4, np.float64)
    y = cbn.batch_norm(x, rm, rv, w, b, training=False)
    assert_close(y, ref.batch_norm(x, rm, rv, w, b, training=False), np.float64, 1)


# ------------------------------------------------------------------ backward vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, lay", case_layouts())
def test_backward_matches_reference(case, lay, dtype):
    shape, axis = case
    C = shape[axis]
    x0 = make_input(shape, axis, dtype)
    dy0 = make_input(shape, axis, dtype, seed=7)
    x, dy = layout(x0, lay), layout(dy0, lay)
    for training in (True, False):
        for with_weight in (False, True):
            msg = f"training={training} weight={with_weight}"
            w, b, rm, rv = make_params(C, dtype)
            if not with_weight:
                w = None
            # saved stats from the oracle (batch stats in training, running ones in eval)
            _, sm, si, _, _ = _reference_forward(x0, w, b, rm, rv, training, axis=axis)
            gx, gw, gb = cbn.batch_norm_backward(dy, x, w, sm, si, training, axis=axis)

            assert gx.shape == shape and gx.dtype == gw.dtype == gb.dtype == dtype
            assert gw.shape == gb.shape == (C,)
            _check_grads(gx, gw, gb, dy0, x0, w, sm, si, training, axis, dtype, msg)
            # grad_input keeps the input's memory order, as one dense block
            assert memory_order(gx) == memory_order(x), msg
            assert is_dense_in_order(gx, memory_order(gx)), msg


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_mixed_layouts_and_dtypes(dtype):
    shape, axis = (3, 4, 5, 6), 1
    C = 4
    x = make_input(shape, axis, dtype)
    dy64 = make_input(shape, axis, np.float64, seed=3)
    w, _, _, _ = make_params(C, dtype)
    _, sm, si, _, _ = _reference_forward(x, w, None, None, None, True, axis=axis)
    # grad_output in another layout and in float64: it is cast to the input's dtype
    dy = np.asfortranarray(dy64)
    gx, gw, gb = cbn.batch_norm_backward(dy, channels_last(x), w.tolist(), list(sm),
                                         tuple(si), True)
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    _check_grads(gx, gw, gb, dy64.astype(dtype), x, w, sm, si, True, axis, dtype)


# ------------------------------------------------------------------------------ out=


def _expected_y(x, training, axis=1):
    """Parameters for x and the reference results: ((w, b, rm, rv), y, rm', rv', sm, si)."""
    C = x.shape[axis]
    w, b, rm, rv = make_params(C, x.dtype)
    ey, esm, esi, erm, erv = _reference_forward(x, w, b, rm, rv, training, axis=axis)
    return (w, b, rm, rv), ey, erm, erv, esm, esi


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1), ((7, 3), 1)],
                         ids=["nchw", "nhwc", "2d"])
def test_out_preallocated(case, dtype, training):
    shape, axis = case
    x = make_input(shape, axis, dtype)
    (w, b, rm, rv), ey, erm, erv, esm, esi = _expected_y(x, training, axis)
    n = n_per_channel(shape, axis)
    out = np.full(shape, np.nan, dtype)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, training, MOMENTUM, EPS, axis=axis,
                                       out=out)
    assert y is out
    assert_close(out, ey, dtype, n)
    assert_close(rm, erm, dtype, n)
    out2 = np.full(shape, np.nan, dtype)
    y2 = cbn.batch_norm(x, erm.copy(), erv.copy(), w, b, False, axis=axis, out=out2)
    assert y2 is out2


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, lay", case_layouts([((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1),
                                                   ((6, 5), 1), ((2, 3, 4, 3, 5), 1)]))
def test_out_is_input_in_place(case, lay, dtype, training):
    shape, axis = case
    x0 = make_input(shape, axis, dtype)
    (w, b, rm, rv), ey, erm, erv, esm, esi = _expected_y(x0, training, axis)
    n = n_per_channel(shape, axis)
    x = layout(x0, lay)
    strides = x.strides
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, training, MOMENTUM, EPS, axis=axis,
                                       out=x)
    assert y is x and x.strides == strides
    assert_close(x, ey, dtype, n)
    assert_close(rm, erm, dtype, n)
    assert_close(rv, erv, dtype, n)
    # save stats are those of the input before it was overwritten
    assert_close(sm, esm, dtype, n)
    assert_close(si, esi, dtype, n)


def _noncontiguous_outs(shape, dtype):
    outs = {}
    base = np.full(shape[:-1] + (2 * shape[-1],), np.nan, dtype)
    outs["sliced"] = base[..., ::2]
    outs["F"] = np.asfortranarray(np.full(shape, np.nan, dtype))
    outs["reversed"] = np.full(shape, np.nan, dtype)[(slice(None, None, -1),) * len(shape)]
    if len(shape) >= 3:
        outs["channels_last"] = channels_last(np.full(shape, np.nan, dtype))
    return outs


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, out_kind", [
    pytest.param(case, kind, id=f"{cid}-{kind}")
    for case, cid in [(((3, 4, 5, 6), 1), "nchw"), (((3, 5, 6, 4), -1), "nhwc"),
                      (((6, 5), 1), "2d")]
    for kind in ("sliced", "F", "reversed", "channels_last")
    if kind != "channels_last" or len(case[0]) >= 3])
def test_out_noncontiguous(case, out_kind, dtype, training):
    shape, axis = case
    out = _noncontiguous_outs(shape, dtype)[out_kind]
    strides = out.strides
    x = make_input(shape, axis, dtype)
    (w, b, rm, rv), ey, erm, erv, esm, esi = _expected_y(x, training, axis)
    y = cbn.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS, axis=axis, out=out)
    assert y is out and out.strides == strides
    assert_close(out, ey, dtype, n_per_channel(shape, axis))
    if out_kind == "sliced":
        np.testing.assert_array_equal(out.base[..., 1::2], np.nan)   # gaps untouched


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_overlapping_input(training, dtype):
    # out is a view of the input's memory in another order: the result must be that of
    # the original input (as a NumPy ufunc would give), not of a half-overwritten one.
    shape, axis = (4, 3, 5), 1
    x = make_input(shape, axis, dtype)
    (w, b, rm, rv), ey, _, _, _, _ = _expected_y(x.copy(), training, axis)
    out = x[::-1]
    cbn.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS, axis=axis, out=out)
    assert_close(out, ey, dtype, n_per_channel(shape, axis))


# ------------------------------------------------------------------ output memory order


@pytest.mark.parametrize("case, lay", case_layouts())
def test_output_memory_order_follows_input(case, lay):
    shape, axis = case
    x = layout(make_input(shape, axis, np.float32), lay)
    order = memory_order(x)
    for training in (True, False):
        w, b, rm, rv = make_params(shape[axis], np.float32)
        y = cbn.batch_norm(x, rm, rv, w, b, training, axis=axis)
        assert memory_order(y) == order
        assert is_dense_in_order(y, order)          # a fresh dense block, no gaps
        assert all(s > 0 for s in y.strides)


@pytest.mark.parametrize("ndim", [4, 5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_input_gives_channels_last_output(ndim, training):
    shape = (2, 3, 4, 5, 6)[:ndim]
    x = channels_last(make_input(shape, 1, np.float64))
    perm = (0,) + tuple(range(2, ndim)) + (1,)
    assert x.transpose(perm).flags.c_contiguous and not x.flags.c_contiguous
    w, b, rm, rv = make_params(3, np.float64)
    y, _, _ = cbn.batch_norm_forward(x, w, b, rm, rv, training, MOMENTUM, EPS)
    assert y.transpose(perm).flags.c_contiguous and not y.flags.c_contiguous
    assert y.strides == x.strides
    gx, _, _ = cbn.batch_norm_backward(np.ones_like(x), x, w, np.zeros(3), np.ones(3), True)
    assert gx.strides == x.strides


# -------------------------------------------------------------- input kinds and dtypes


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_input(dtype, training):
    shape, axis = (3, 4, 5, 6), 1
    x = read_only(make_input(shape, axis, dtype))
    w, b, rm, rv = make_params(4, dtype)
    ey, esm, esi, erm, erv = _reference_forward(x, w, b, rm, rv, training)
    # weight, bias (and, in eval, the running stats) may be read-only too
    w, b = read_only(w), read_only(b)
    if not training:
        rm, rv = read_only(rm), read_only(rv)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, training, MOMENTUM, EPS)
    n = n_per_channel(shape, axis)
    assert_close(y, ey, dtype, n)
    assert_close(rm, erm, dtype, n)
    assert y.flags.writeable
    dy = read_only(make_input(shape, axis, dtype, seed=4))
    gx, gw, gb = cbn.batch_norm_backward(dy, x, w, read_only(sm), read_only(si), training)
    _check_grads(gx, gw, gb, dy, x, w, sm, si, training, axis, dtype)


def test_list_inputs():
    shape, axis = (4, 3, 2), 1
    x = make_input(shape, axis, np.float64)
    w, b, rm, rv = make_params(3, np.float64)
    n = n_per_channel(shape, axis)
    ey, esm, esi, erm, erv = _reference_forward(x, w, b, rm, rv, True)
    rm1, rv1 = rm.copy(), rv.copy()
    # nested lists become float64 arrays; weight/bias may be lists or tuples
    y, sm, si = cbn.batch_norm_forward(x.tolist(), w.tolist(), tuple(b), rm1, rv1, True,
                                       MOMENTUM, EPS)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    assert_close(y, ey, np.float64, n)
    assert_close(rm1, erm, np.float64, n)
    # in eval, the running stats may be lists too
    ey2 = ref.batch_norm(x, rm, rv, w, b, False)
    y2 = cbn.batch_norm(x.tolist(), rm.tolist(), rv.tolist(), w.tolist(), b.tolist(), False)
    assert_close(y2, ey2, np.float64, n)
    # backward from lists
    dy = make_input(shape, axis, np.float64, seed=4)
    gx, gw, gb = cbn.batch_norm_backward(dy.tolist(), x.tolist(), w.tolist(), sm.tolist(),
                                         si.tolist(), True)
    _check_grads(gx, gw, gb, dy, x, w, sm, si, True, axis, np.float64)


def test_params_of_other_dtypes_are_converted():
    # float32 input with float64 / integer parameters and float64 running stats in eval
    shape, axis = (5, 3, 4), 1
    x = make_input(shape, axis, np.float32)
    w = np.array([1, -2, 3])
    b = np.array([0.5, 0.25, -1.0], np.float64)
    rm = np.array([0.1, -0.2, 0.3], np.float64)
    rv = np.array([1.5, 0.5, 2.0], np.float64)
    y = cbn.batch_norm(x, rm, rv, w, b, training=False)
    assert y.dtype == np.float32
    assert_close(y, ref.batch_norm(x, rm, rv, w, b, training=False), np.float32,
                 n_per_channel(shape, axis))


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_input(dtype):
    # stride-0 axes (np.broadcast_to) are read correctly
    x = np.broadcast_to(make_input((1, 3, 4), 1, dtype), (5, 3, 4))
    assert x.strides[0] == 0
    w, b, rm, rv = make_params(3, dtype)
    ey, _, _, erm, _ = _reference_forward(np.array(x), w, b, rm, rv, True)
    y = cbn.batch_norm(x, rm, rv, w, b, training=True)
    assert_close(y, ey, dtype, 20)
    assert_close(rm, erm, dtype, 20)


# ----------------------------------------------------------------- zero-element inputs


ZERO_CASES = [((0, 3), 1), ((0, 3, 4), 1), ((2, 3, 0), 1), ((0, 4, 5, 3), -1),
              ((2, 0, 4, 3), -1), ((4, 0), 1), ((2, 0, 3), 1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ZERO_CASES, ids=[
    "x".join(map(str, s)) + f"-ax{a}" for s, a in ZERO_CASES])
def test_zero_element_input(case, dtype, training):
    shape, axis = case
    C = shape[axis]
    x = np.empty(shape, dtype)
    w, b, rm, rv = make_params(C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y = cbn.batch_norm(x, rm, rv, w, b, training, axis=axis)
    assert y.shape == shape and y.dtype == dtype and y.size == 0
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    out = np.empty(shape, dtype)
    y2, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, training, MOMENTUM, EPS, axis=axis,
                                        out=out)
    assert y2 is out and sm.shape == si.shape == (C,)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    gx, gw, gb = cbn.batch_norm_backward(x, x, w, rm, rv, training, axis=axis)
    egx, egw, egb = ref.batch_norm_backward(x, x, w, rm, rv, training, axis=axis)
    assert gx.shape == shape and gx.dtype == dtype
    np.testing.assert_array_equal(gw, egw)      # empty sums are 0
    np.testing.assert_array_equal(gb, egb)


# --------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((4, 3, 6), 1), ((4, 6, 3), -1), ((5, 3), 1),
                                  ((2, 3, 4, 3, 2), 1)], ids=["ncl", "nlc", "2d", "5d"])
def test_nonfinite_poisons_only_its_channel_in_training(case, dtype, bad):
    # Like PyTorch: a NaN or inf in channel 1 makes that channel's statistics NaN (or inf),
    # so every output of channel 1 is NaN; the other channels are unaffected.
    shape, axis = case
    x = make_input(shape, axis, dtype)
    xm = np.moveaxis(x, axis, -1)
    xm[(0,) * (x.ndim - 1) + (1,)] = bad
    w, b, rm, rv = make_params(3, dtype)
    ey, _, _, erm, erv = _reference_forward(x, w, b, rm, rv, True, axis=axis)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, MOMENTUM, EPS, axis=axis)
    ym = np.moveaxis(y, axis, -1)
    assert np.isnan(ym[..., 1]).all()
    good = [0, 2]
    assert np.isfinite(ym[..., good]).all()
    n = n_per_channel(shape, axis)
    assert_close(ym[..., good], np.moveaxis(ey, axis, -1)[..., good], dtype, n)
    # the poisoned channel's statistics: mean NaN or inf, variance (hence invstd and the
    # running var) NaN -- PyTorch gives the same
    assert not np.isfinite(sm[1]), sm
    assert not np.isfinite(rm[1]), rm
    assert np.isnan(si[1]), f"save_invstd[1] = {si[1]}, expected NaN"
    assert np.isnan(rv[1]), f"running_var[1] = {rv[1]}, expected NaN"
    assert_close(rm[good], erm[good], dtype, n)
    assert_close(rv[good], erv[good], dtype, n)
    assert_close(si[good], _reference_forward(x, w, b, None, None, True, axis=axis)[2][good],
                 dtype, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((4, 3, 6), 1), ((4, 6, 3), -1)], ids=["ncl", "nlc"])
def test_nan_in_eval_stays_in_its_element(case, dtype):
    shape, axis = case
    x = make_input(shape, axis, dtype)
    x[(1,) * x.ndim] = np.nan
    w, b, rm, rv = make_params(3, dtype)
    y = cbn.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_running_stat_in_eval_poisons_its_channel(dtype):
    x = make_input((4, 3, 5), 1, dtype)
    w, b, rm, rv = make_params(3, dtype)
    rm[2] = np.nan
    y = cbn.batch_norm(x, rm, rv, w, b, training=False)
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[:, :2]).all()


# ------------------------------------------------------------------ eps = 0, constants


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((4, 3, 6), 1), ((4, 6, 3), -1), ((5, 3), 1),
                                  ((3, 3, 40, 40), 1), ((3, 40, 40, 3), -1)],
                         ids=["ncl", "nlc", "2d", "nchw_big", "nhwc_big"])
def test_eps_zero_constant_channel_gives_bias_exactly(case, dtype):
    shape, axis = case
    x = make_input(shape, axis, dtype)
    np.moveaxis(x, axis, -1)[..., 1] = dtype(2.5)
    w, b, rm, rv = make_params(3, dtype)
    ey, esm, esi, erm, erv = _reference_forward(x, w, b, rm, rv, True, eps=0.0, axis=axis)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, MOMENTUM, 0.0, axis=axis)
    ym = np.moveaxis(y, axis, -1)
    assert si[1] == 0
    assert sm[1] == dtype(2.5)
    assert (ym[..., 1] == b[1]).all()
    n = n_per_channel(shape, axis)
    assert_close(y, ey, dtype, n)
    assert_close(si, esi, dtype, n)
    assert_close(rv, erv, dtype, n)
    # backward: the constant channel has invstd 0, so its grad_input is exactly 0
    dy = make_input(shape, axis, dtype, seed=5)
    gx, gw, gb = cbn.batch_norm_backward(dy, x, w, sm, si, True, axis=axis)
    assert (np.moveaxis(gx, axis, -1)[..., 1] == 0).all()
    assert gw[1] == 0
    _check_grads(gx, gw, gb, dy, x, w, sm, si, True, axis, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eps_zero_in_eval_with_zero_running_var(dtype):
    x = make_input((4, 3, 5), 1, dtype)
    w, b, rm, rv = make_params(3, dtype)
    rv[0] = 0
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, False, MOMENTUM, 0.0)
    assert si[0] == 0
    assert (y[:, 0] == b[0]).all()
    assert_close(y[:, 1:], ref.batch_norm(x, rm, rv, w, b, False, eps=0.0)[:, 1:], dtype, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lay", ["C", "F", "channels_last"])
def test_any_axis(dtype, lay):
    # every valid axis of a 4D array, positive and negative, in a few layouts
    shape = (3, 4, 5, 6)
    for axis in range(-4, 4):
        x0 = make_input(shape, axis, dtype, seed=axis + 10)
        x = strided_variants(x0)[lay]
        C, n = shape[axis], n_per_channel(shape, axis)
        w, b, rm, rv = make_params(C, dtype)
        ey, esm, esi, erm, erv = _reference_forward(x0, w, b, rm, rv, True, axis=axis)
        y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, MOMENTUM, EPS, axis=axis)
        assert_close(y, ey, dtype, n, err_msg=f"axis {axis}")
        assert_close(rv, erv, dtype, n, err_msg=f"axis {axis}")
