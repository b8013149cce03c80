"""cbn.BatchNorm / BatchNorm1d / 2d / 3d without PyTorch: state, modes, errors, backward
(against finite differences), state_dict, save/load, pickle, threads.

Expected values are computed here in float64 NumPy from the definitions, independently of
cbn.functional and cbn._reference. Parity with torch.nn is in test_module_torch_parity.py.
"""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest

import cbn
from cbn.modules import IncompatibleKeys

CLASSES = {1: cbn.BatchNorm1d, 2: cbn.BatchNorm2d, 3: cbn.BatchNorm3d}
SHAPE_FOR = {cbn.BatchNorm1d: (6, 4, 3), cbn.BatchNorm2d: (3, 4, 2, 5),
             cbn.BatchNorm3d: (2, 4, 3, 2, 2), cbn.BatchNorm: (5, 4, 3)}


def _data(shape, seed=0, dtype=np.float32, axis=1):
    """Per-channel shifted and scaled normal data (so each channel has its own stats)."""
    rng = np.random.default_rng(seed)
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    shift = rng.uniform(-3, 3, C).reshape(bshape)
    scale = rng.uniform(0.5, 2, C).reshape(bshape)
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


def _stats(x, axis=1):
    """(mean, biased var, unbiased var, n) per channel in float64."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])
    n = x.shape[0]
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return mean, var, var * n / (n - 1), n


def _bshape(x, axis):
    s = [1] * x.ndim
    s[axis] = x.shape[axis]
    return s


def _expected(x, mean, var, w, b, eps, axis=1):
    s = _bshape(x, axis)
    return ((x.astype(np.float64) - mean.reshape(s)) / np.sqrt(var.reshape(s) + eps)
            * w.reshape(s) + b.reshape(s))


def _snapshot(m):
    """Everything a failed call must leave unchanged."""
    return (m.training, m.num_batches_tracked, copy.deepcopy(m.state_dict()),
            None if m.grad_weight is None else m.grad_weight.copy(),
            None if m.grad_bias is None else m.grad_bias.copy(), m._saved)


def _assert_same(m, snap):
    training, nbt, state, gw, gb, saved = snap
    assert m.training == training
    assert m.num_batches_tracked == nbt
    now = m.state_dict()
    assert list(now) == list(state)
    for k in state:
        np.testing.assert_array_equal(now[k], state[k])
    for g, before in ((m.grad_weight, gw), (m.grad_bias, gb)):
        if before is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, before)
    assert m._saved is saved


# ------------------------------------------------------------------------- construction


@pytest.mark.parametrize("cls", [cbn.BatchNorm, cbn.BatchNorm1d, cbn.BatchNorm2d,
                                 cbn.BatchNorm3d])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_defaults(cls, dtype):
    m = cls(7, dtype=dtype)
    assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == \
        (7, 1e-5, 0.1, True, True)
    assert m.training is True and m.axis == 1 and m.dtype == np.dtype(dtype)
    for name, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
        a = getattr(m, name)
        assert isinstance(a, np.ndarray) and a.shape == (7,) and a.dtype == dtype
        np.testing.assert_array_equal(a, value)
    assert m.num_batches_tracked == 0
    assert m.grad_weight is None and m.grad_bias is None


def test_affine_false_and_no_tracking():
    m = cbn.BatchNorm2d(3, affine=False, track_running_stats=False)
    assert m.weight is None and m.bias is None
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    assert m.state_dict() == {}


@pytest.mark.parametrize("kwargs, exc", [
    ({"num_features": 0}, ValueError), ({"num_features": -2}, ValueError),
    ({"num_features": 2.5}, TypeError), ({"num_features": True}, TypeError),
    ({"num_features": 3, "eps": -1e-3}, ValueError), ({"num_features": 3, "eps": np.nan}, ValueError),
    ({"num_features": 3, "eps": np.inf}, ValueError), ({"num_features": 3, "eps": "1"}, TypeError),
    ({"num_features": 3, "momentum": "0.1"}, TypeError),
    ({"num_features": 3, "momentum": np.nan}, ValueError),
    ({"num_features": 3, "dtype": np.float16}, TypeError),
    ({"num_features": 3, "dtype": np.int32}, TypeError),
    ({"num_features": 3, "dtype": "nonsense"}, TypeError),
    ({"num_features": 3, "axis": 4}, np.exceptions.AxisError),
    ({"num_features": 3, "axis": -5}, np.exceptions.AxisError),
    ({"num_features": 3, "axis": 1.0}, TypeError),
])
def test_constructor_errors(kwargs, exc):
    with pytest.raises(exc):
        cbn.BatchNorm2d(**kwargs)


def test_repr_like_pytorch():
    assert repr(cbn.BatchNorm2d(64)) == \
        "BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    assert repr(cbn.BatchNorm1d(5, eps=0, momentum=None, affine=False,
                                track_running_stats=False)) == \
        "BatchNorm1d(5, eps=0.0, momentum=None, affine=False, track_running_stats=False)"
    assert repr(cbn.BatchNorm(3, dtype=np.float64, axis=-1)) == \
        ("BatchNorm(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
         "dtype=float64, axis=-1)")


def test_train_eval_return_self():
    m = cbn.BatchNorm1d(3)
    assert m.eval() is m and m.training is False
    assert m.train() is m and m.training is True
    assert m.train(False) is m and m.training is False
    with pytest.raises(ValueError, match="boolean"):
        m.train("yes")
    assert m.training is False


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
def test_forward_and_running_stats(cls, dtype, tol):
    shape = SHAPE_FOR[cls]
    C = shape[1]
    m = cls(C, momentum=0.25, eps=1e-3, dtype=dtype)
    rng = np.random.default_rng(1)
    m.weight[:] = rng.uniform(0.5, 2, C)
    m.bias[:] = rng.uniform(-1, 1, C)
    w, b = m.weight.astype(np.float64), m.bias.astype(np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    for step in range(3):
        x = _data(shape, seed=step, dtype=dtype)
        x_before = x.copy()
        y = m(x)
        mean, var, uvar, _ = _stats(x)
        rm = 0.75 * rm + 0.25 * mean
        rv = 0.75 * rv + 0.25 * uvar
        assert y.shape == x.shape and y.dtype == dtype and y is not x
        np.testing.assert_array_equal(x, x_before)          # input untouched
        np.testing.assert_allclose(y, _expected(x, mean, var, w, b, 1e-3), rtol=tol, atol=tol)
        np.testing.assert_allclose(m.running_mean, rm, rtol=tol, atol=tol)
        np.testing.assert_allclose(m.running_var, rv, rtol=tol, atol=tol)
        assert m.num_batches_tracked == step + 1
    m.eval()
    x = _data(shape, seed=9, dtype=dtype)
    rm_before = m.running_mean.copy()
    y = m.forward(x)
    np.testing.assert_allclose(y, _expected(x, rm, rv, w, b, 1e-3), rtol=tol, atol=tol)
    np.testing.assert_array_equal(m.running_mean, rm_before)
    assert m.num_batches_tracked == 3


def test_momentum_none_is_cumulative_average():
    m = cbn.BatchNorm1d(4, momentum=None, dtype=np.float64)
    means, uvars = [], []
    for step in range(5):
        x = _data((10, 4), seed=step, dtype=np.float64)
        m(x)
        mean, _, uvar, _ = _stats(x)
        means.append(mean)
        uvars.append(uvar)
        # factor 1/num_batches_tracked: the simple mean of the batches seen so far
        np.testing.assert_allclose(m.running_mean, np.mean(means, 0), rtol=1e-12)
        np.testing.assert_allclose(m.running_var, np.mean(uvars, 0), rtol=1e-12)
    assert m.num_batches_tracked == 5
    m.reset_running_stats()
    m(x)       # counting restarts: the first batch replaces the initial values
    np.testing.assert_allclose(m.running_mean, means[-1], rtol=1e-12)


def test_momentum_none_without_tracking_in_training():
    m = cbn.BatchNorm1d(3, momentum=None, track_running_stats=False, dtype=np.float64)
    x = _data((6, 3), dtype=np.float64)
    mean, var, _, _ = _stats(x)
    np.testing.assert_allclose(m(x), _expected(x, mean, var, np.ones(3), np.zeros(3), 1e-5),
                               rtol=1e-12)


def test_no_tracking_eval_uses_batch_statistics():
    m = cbn.BatchNorm2d(4, track_running_stats=False, dtype=np.float64)
    x = _data((3, 4, 2, 5), dtype=np.float64)
    y_train = m(x)
    y_eval = m.eval()(x)
    np.testing.assert_array_equal(y_train, y_eval)
    mean, var, _, _ = _stats(x)
    np.testing.assert_allclose(y_eval, _expected(x, mean, var, np.ones(4), np.zeros(4), 1e-5),
                               rtol=1e-12)
    assert m.num_batches_tracked is None


def test_tracking_switched_off_after_construction():
    # PyTorch's rule: running stats are passed only if (not training or track_running_stats),
    # so a module built with buffers and then told not to track keeps them frozen in training
    # and still uses them in eval.
    m = cbn.BatchNorm1d(3, dtype=np.float64)
    m.running_mean[:] = [1.0, 2.0, 3.0]
    m.running_var[:] = [4.0, 4.0, 4.0]
    m.track_running_stats = False
    x = _data((8, 3), dtype=np.float64)
    mean, var, _, _ = _stats(x)
    np.testing.assert_allclose(m(x), _expected(x, mean, var, np.ones(3), np.zeros(3), 1e-5),
                               rtol=1e-12)
    np.testing.assert_array_equal(m.running_mean, [1, 2, 3])
    np.testing.assert_array_equal(m.running_var, [4, 4, 4])
    assert m.num_batches_tracked == 0
    m.eval()
    np.testing.assert_allclose(m(x), _expected(x, np.array([1.0, 2, 3]), np.full(3, 4.0),
                                               np.ones(3), np.zeros(3), 1e-5), rtol=1e-12)


def test_eval_with_running_stats_removed_uses_batch_statistics():
    # PyTorch's rule: bn_training = training or (running_mean is None and running_var is None)
    m = cbn.BatchNorm1d(3, dtype=np.float64).eval()
    m.running_mean = m.running_var = None
    x = _data((8, 3), dtype=np.float64)
    mean, var, _, _ = _stats(x)
    np.testing.assert_allclose(m(x), _expected(x, mean, var, np.ones(3), np.zeros(3), 1e-5),
                               rtol=1e-12)


def test_channels_last_matches_channels_first():
    x = _data((3, 5, 4, 6), seed=2)
    m1 = cbn.BatchNorm2d(5, momentum=0.3)
    m2 = cbn.BatchNorm2d(5, momentum=0.3, axis=-1)
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    g = _data(x.shape, seed=3)
    for training in (True, False):
        m1.train(training)
        m2.train(training)
        y1, y2 = m1(x), m2(x_last)
        np.testing.assert_allclose(y2.transpose(0, 3, 1, 2), y1, rtol=1e-5, atol=1e-5)
        dx1 = m1.backward(g)
        dx2 = m2.backward(np.ascontiguousarray(g.transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(dx2.transpose(0, 3, 1, 2), dx1, rtol=1e-4, atol=1e-5)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(m2, k), getattr(m1, k), rtol=1e-6)
    np.testing.assert_allclose(m2.grad_weight, m1.grad_weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m2.grad_bias, m1.grad_bias, rtol=1e-4, atol=1e-4)


def test_generic_batchnorm_accepts_2d_to_5d():
    m = cbn.BatchNorm(3)
    for shape in [(4, 3), (4, 3, 2), (4, 3, 2, 2), (2, 3, 2, 2, 2)]:
        assert m(_data(shape)).shape == shape
    assert m.num_batches_tracked == 4


def test_array_like_input():
    m = cbn.BatchNorm1d(2, dtype=np.float64)
    y = m([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(y, [[-1, -1], [1, 1]], atol=1e-4)
    with pytest.raises(TypeError, match="float32"):
        cbn.BatchNorm1d(2)([[1.0, 2.0], [3.0, 6.0]])     # a list gives float64


def test_zero_element_input():
    m = cbn.BatchNorm1d(3)
    y = m(np.zeros((0, 3), np.float32))
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls, shape, message", [
    (cbn.BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
    (cbn.BatchNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
    (cbn.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
    (cbn.BatchNorm2d, (2, 3, 4, 5, 6), "expected 4D input (got 5D input)"),
    (cbn.BatchNorm3d, (2, 3, 4, 5), "expected 5D input (got 4D input)"),
    (cbn.BatchNorm, (3,), "expected 2D to 5D input (got 1D input)"),
    (cbn.BatchNorm, (1, 3, 1, 1, 1, 2), "expected 2D to 5D input (got 6D input)"),
])
def test_wrong_ndim(cls, shape, message):
    m = cls(3)
    snap = _snapshot(m)
    with pytest.raises(ValueError) as info:
        m(np.ones(shape, np.float32))
    assert str(info.value) == message
    _assert_same(m, snap)


def _trained(cls=cbn.BatchNorm2d, **kwargs):
    """A module after one training step and one backward (so every state is non-trivial)."""
    m = cls(4, **kwargs)
    x = _data(SHAPE_FOR[cls])
    m(x)
    m.backward(_data(x.shape, seed=5))
    return m


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bad_input, exc, match", [
    (np.ones((2, 3, 2, 2), np.float32), ValueError, "expected 4 channels"),
    (np.ones((2, 4, 2, 2), np.float64), TypeError, "float64 input"),
    (np.ones((2, 4, 2, 2), np.complex64), TypeError, "dtype complex64"),
    (np.ones((2, 4, 2, 2), np.int64), TypeError, "dtype int64"),
    (np.ones((2, 4, 2), np.float32), ValueError, "expected 4D input"),
])
def test_bad_input_changes_nothing(training, bad_input, exc, match):
    m = _trained().train(training)
    snap = _snapshot(m)
    with pytest.raises(exc, match=match):
        m(bad_input)
    _assert_same(m, snap)


@pytest.mark.parametrize("affine", [True, False])
def test_wrong_channel_count_without_parameters_or_buffers(affine):
    # With nothing per-channel to check against, the module itself checks num_features.
    m = cbn.BatchNorm1d(4, affine=affine, track_running_stats=False)
    with pytest.raises(ValueError, match=r"expected 4 channels \(num_features\) along axis 1"):
        m(np.ones((5, 3), np.float32))


def test_axis_out_of_range_for_input():
    m = cbn.BatchNorm(3, axis=3)
    with pytest.raises(np.exceptions.AxisError):
        m(np.ones((2, 3, 4), np.float32))
    assert m(np.ones((2, 2, 2, 3), np.float32)).shape == (2, 2, 2, 3)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_value_per_channel_in_training_changes_nothing(momentum):
    m = _trained(cbn.BatchNorm1d, momentum=momentum)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when "
                                         r"training, got input size \(1, 4\)"):
        m(np.ones((1, 4), np.float32))
    _assert_same(m, snap)     # PyTorch would have counted the batch; cbn does not
    m.eval()
    assert m(np.ones((1, 4), np.float32)).shape == (1, 4)   # fine in eval


# ----------------------------------------------------------------------------- backward


def _numeric_grads(m, x, g, h=1e-6):
    """Finite-difference gradients of sum(g * m(x)) with respect to x, weight, bias.
    Training-mode calls are made on deep copies so the running stats do not move."""
    def f(x_, w_, b_):
        mm = copy.deepcopy(m)
        if mm.affine:
            mm.weight[...] = w_
            mm.bias[...] = b_
        return float(np.sum(g * mm(x_)))

    w = m.weight.copy() if m.affine else None
    b = m.bias.copy() if m.affine else None
    grads = []
    for which, base in (("x", x), ("w", w), ("b", b)):
        if base is None:
            grads.append(None)
            continue
        d = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[i] += h
            minus[i] -= h
            args_p = {"x": x, "w": w, "b": b}
            args_m = dict(args_p)
            args_p[which], args_m[which] = plus, minus
            d[i] = (f(args_p["x"], args_p["w"], args_p["b"])
                    - f(args_m["x"], args_m["w"], args_m["b"])) / (2 * h)
        grads.append(d)
    return grads


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 2, 3, 3), -1)])
def test_backward_matches_finite_differences(training, affine, shape, axis):
    C = shape[axis]
    m = cbn.BatchNorm(C, affine=affine, dtype=np.float64, axis=axis, momentum=0.5)
    rng = np.random.default_rng(4)
    if affine:
        m.weight[:] = rng.uniform(0.5, 2, C)
        m.bias[:] = rng.uniform(-1, 1, C)
    m.running_mean[:] = rng.uniform(-1, 1, C)
    m.running_var[:] = rng.uniform(0.5, 2, C)
    m.train(training)
    x = _data(shape, seed=6, dtype=np.float64, axis=axis)
    g = rng.standard_normal(shape)
    num_x, num_w, num_b = _numeric_grads(m, x, g)
    m(x)
    dx = m.backward(g)
    np.testing.assert_allclose(dx, num_x, rtol=1e-6, atol=1e-7)
    if affine:
        np.testing.assert_allclose(m.grad_weight, num_w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m.grad_bias, num_b, rtol=1e-6, atol=1e-7)
    else:
        assert m.grad_weight is None and m.grad_bias is None


def test_backward_uses_the_last_forward_mode():
    m = cbn.BatchNorm1d(3, dtype=np.float64)
    m.running_var[:] = [4.0, 1.0, 0.25]
    x = _data((6, 3), dtype=np.float64)
    g = _data((6, 3), seed=1, dtype=np.float64)
    m(x)
    dx_train = m.backward(g)
    m.running_var[:] = [4.0, 1.0, 0.25]           # the training step moved it
    m.eval()(x)
    dx_eval = m.backward(g)
    # eval: dx = weight * invstd(running_var) * dy
    np.testing.assert_allclose(dx_eval, g / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-5),
                               rtol=1e-12)
    # training: the gradient through the batch mean sums to zero per channel
    np.testing.assert_allclose(dx_train.sum(0), 0, atol=1e-10)
    assert not np.allclose(dx_train, dx_eval)


def test_grad_accumulation_and_zero_grad():
    m = cbn.BatchNorm2d(4, dtype=np.float64)
    x = _data((3, 4, 2, 2), dtype=np.float64)
    g1 = _data(x.shape, seed=1, dtype=np.float64)
    g2 = _data(x.shape, seed=2, dtype=np.float64)
    m(x)
    m.backward(g1)
    gw1, gb1 = m.grad_weight.copy(), m.grad_bias.copy()
    np.testing.assert_allclose(gb1, g1.sum(axis=(0, 2, 3)), rtol=1e-12)
    held = m.grad_weight
    m.backward(g2)                        # same forward, a second gradient: accumulates
    assert m.grad_weight is held          # in place, like .grad
    m.zero_grad()
    assert m.grad_weight is None and m.grad_bias is None
    m.backward(g2)
    gw2, gb2 = m.grad_weight.copy(), m.grad_bias.copy()
    np.testing.assert_allclose(held, gw1 + gw2, rtol=1e-12)
    m.backward(g1)
    np.testing.assert_allclose(m.grad_bias, gb1 + gb2, rtol=1e-12)
    held = m.grad_bias
    m.zero_grad(set_to_none=False)
    assert m.grad_bias is held
    np.testing.assert_array_equal(m.grad_bias, 0)
    np.testing.assert_array_equal(m.grad_weight, 0)


def test_backward_errors_change_nothing():
    m = cbn.BatchNorm1d(4)
    with pytest.raises(RuntimeError, match="needs a forward"):
        m.backward(np.ones((2, 4), np.float32))
    m = _trained(cbn.BatchNorm1d)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"grad_output has shape \(6, 4\), expected \(6, 4, 3\)"):
        m.backward(np.ones((6, 4), np.float32))
    with pytest.raises(TypeError, match="int64"):
        m.backward(np.ones((6, 4, 3), np.int64))
    _assert_same(m, snap)


def test_backward_follows_last_successful_forward():
    m = cbn.BatchNorm1d(4)
    x = _data((5, 4))
    m(x)
    with pytest.raises(ValueError):
        m(np.ones((5, 3), np.float32))
    assert m.backward(np.ones_like(x)).shape == x.shape


# --------------------------------------------------------------------------- state dict


def test_state_dict_keys_and_copies():
    m = _trained(cbn.BatchNorm2d)
    d = m.state_dict()
    assert list(d) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert d["num_batches_tracked"].dtype == np.int64 and d["num_batches_tracked"].shape == ()
    assert int(d["num_batches_tracked"]) == 1
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert d[k].dtype == np.float32 and d[k].shape == (4,)
        assert not np.shares_memory(d[k], getattr(m, k))
    assert list(cbn.BatchNorm1d(3, affine=False).state_dict()) == \
        ["running_mean", "running_var", "num_batches_tracked"]
    assert list(cbn.BatchNorm1d(3, track_running_stats=False).state_dict()) == ["weight", "bias"]


def test_load_state_dict_round_trip_keeps_identity():
    src = _trained(cbn.BatchNorm2d, momentum=0.5)
    src.weight[:] = [1, 2, 3, 4]
    dst = cbn.BatchNorm2d(4)
    ids = {k: id(getattr(dst, k)) for k in ("weight", "bias", "running_mean", "running_var")}
    assert dst.load_state_dict(src.state_dict()) == IncompatibleKeys([], [])
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[k], v)
        if k != "num_batches_tracked":
            assert id(getattr(dst, k)) == ids[k]
    x = _data((2, 4, 3, 3), seed=7)
    np.testing.assert_array_equal(src.eval()(x), dst.eval()(x))


def test_load_state_dict_converts_dtypes_and_array_likes():
    m = cbn.BatchNorm1d(3)
    m.load_state_dict({"weight": [1, 2, 3], "bias": np.array([0.5, 0.25, 0.125]),
                       "running_mean": (0.1, 0.2, 0.3),
                       "running_var": np.array([1, 2, 3], np.int16),
                       "num_batches_tracked": 7})
    assert m.weight.dtype == np.float32
    np.testing.assert_array_equal(m.weight, [1, 2, 3])
    np.testing.assert_array_equal(m.running_mean, np.float32([0.1, 0.2, 0.3]))
    assert m.num_batches_tracked == 7


def test_load_state_dict_strict_lists_keys():
    m = cbn.BatchNorm1d(3)
    snap = _snapshot(m)
    d = m.state_dict()
    del d["running_var"], d["bias"]
    d["extra"] = np.zeros(3)
    d["bn.weight"] = np.zeros(3)
    with pytest.raises(ValueError) as info:
        m.load_state_dict(d)
    msg = str(info.value)
    assert "missing key(s): 'bias', 'running_var'" in msg
    assert "unexpected key(s): 'extra', 'bn.weight'" in msg
    assert "BatchNorm1d" in msg
    _assert_same(m, snap)


def test_load_state_dict_non_strict():
    m = cbn.BatchNorm1d(3)
    result = m.load_state_dict({"weight": np.full(3, 2.0), "other": 1}, strict=False)
    # As in PyTorch, a state dict without num_batches_tracked is one saved before that buffer
    # existed: the counter is kept, not reported missing (see test_state_interop.py).
    assert result.missing_keys == ["bias", "running_mean", "running_var"]
    assert result.unexpected_keys == ["other"]
    np.testing.assert_array_equal(m.weight, 2)
    np.testing.assert_array_equal(m.bias, 0)


@pytest.mark.parametrize("key, value, exc, match", [
    ("bias", np.zeros(5), ValueError, r"size mismatch for bias"),
    ("bias", np.zeros((1, 4)), ValueError, r"size mismatch for bias"),
    ("running_var", np.ones(4, bool), TypeError, "bool"),
    ("running_var", np.ones(4, complex), TypeError, "complex"),
    ("running_var", np.array(["a", "b", "c", "d"]), TypeError, "<U1"),
    ("running_mean", np.array([1e300, 0, 0, 0]), ValueError, "too large for float32"),
    ("running_mean", [[1, 2], [3]], TypeError, "cannot convert"),
    ("num_batches_tracked", np.array(2.0), TypeError, "integer"),
    ("num_batches_tracked", np.array(-1), ValueError, "non-negative"),
    ("num_batches_tracked", np.arange(3), ValueError, "scalar"),
])
def test_load_state_dict_bad_values_change_nothing(key, value, exc, match):
    m = _trained(cbn.BatchNorm1d, momentum=0.3)
    snap = _snapshot(m)
    d = cbn.BatchNorm1d(4).state_dict()
    d["weight"] = np.full(4, 5.0)           # a valid value that must not be written either
    d[key] = value
    with pytest.raises(exc, match=match):
        m.load_state_dict(d)
    _assert_same(m, snap)


def test_load_state_dict_needs_a_mapping():
    with pytest.raises(TypeError, match="mapping"):
        cbn.BatchNorm1d(3).load_state_dict([("weight", np.ones(3))])


def test_reset_running_stats_and_parameters():
    m = _trained(cbn.BatchNorm2d)
    m.weight[:] = 3
    rm = m.running_mean
    m.reset_running_stats()
    assert m.running_mean is rm and m.num_batches_tracked == 0
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)
    np.testing.assert_array_equal(m.weight, 3)
    m(_data((3, 4, 2, 5)))
    m.reset_parameters()
    np.testing.assert_array_equal(m.weight, 1)
    np.testing.assert_array_equal(m.bias, 0)
    np.testing.assert_array_equal(m.running_mean, 0)
    assert m.num_batches_tracked == 0
    cbn.BatchNorm2d(2, affine=False, track_running_stats=False).reset_parameters()  # no-op


# ------------------------------------------------------------------ save, load, pickle


@pytest.mark.parametrize("cls, kwargs", [
    (cbn.BatchNorm1d, {}),
    (cbn.BatchNorm2d, {"eps": 0.0, "momentum": None, "dtype": np.float64, "axis": -1}),
    (cbn.BatchNorm3d, {"affine": False}),
    (cbn.BatchNorm, {"track_running_stats": False, "momentum": 0.7}),
])
def test_save_and_load_round_trip(tmp_path, cls, kwargs):
    m = cls(4, **kwargs)
    axis = m.axis
    shape = list(SHAPE_FOR[cls])
    shape[1], shape[axis] = shape[axis], 4
    x = _data(tuple(shape), dtype=m.dtype, axis=axis)
    m(x)
    m(x * 2 + 1)
    if m.affine:
        m.weight[:] = [0.5, 1.5, 2.5, 3.5]
    m.eval()
    path = m.save(tmp_path / "bn")
    assert path.endswith("bn.npz")
    loaded = cbn.load(path)
    assert type(loaded) is cls
    assert repr(loaded) == repr(m)
    assert loaded.training is False and loaded.dtype == m.dtype
    assert loaded.num_batches_tracked == m.num_batches_tracked
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v)
    np.testing.assert_array_equal(loaded(x), m(x))


def test_load_rejects_foreign_npz(tmp_path):
    p = tmp_path / "other.npz"
    np.savez(p, weight=np.ones(3))
    with pytest.raises(ValueError, match="not a module saved by cbn"):
        cbn.load(p)


def test_save_subclass_as_its_cbn_base(tmp_path):
    class MyBN(cbn.BatchNorm2d):
        pass

    m = MyBN(3)
    assert type(cbn.load(m.save(tmp_path / "m.npz"))) is cbn.BatchNorm2d


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_pickle_and_deepcopy(clone):
    m = _trained(cbn.BatchNorm2d, momentum=None)
    m.eval()
    c = clone(m)
    assert type(c) is type(m) and repr(c) == repr(m) and c.training is False
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(c.state_dict()[k], v)
        if k != "num_batches_tracked":
            assert not np.shares_memory(getattr(c, k), getattr(m, k))
    np.testing.assert_array_equal(c.grad_weight, m.grad_weight)
    x = _data((3, 4, 2, 5), seed=8)
    np.testing.assert_array_equal(c(x), m(x))
    c.train()(x)                      # the copy is independent
    assert c.num_batches_tracked == 2 and m.num_batches_tracked == 1
    # the backward record (a reference to the last input) is not copied
    with pytest.raises(RuntimeError, match="needs a forward"):
        clone(m).backward(np.ones_like(x))


# ------------------------------------------------------------------------------ threads


@pytest.mark.parametrize("shape", [(8, 16), (4, 16, 32, 32)])   # small, and multi-threaded
def test_eval_is_thread_safe(shape):
    m = cbn.BatchNorm(16, momentum=0.3)
    for seed in range(3):
        m(_data(shape, seed=seed))
    m.eval()
    inputs = [_data(shape, seed=10 + i) for i in range(8)]
    expected = [m(x) for x in inputs]
    state = m.state_dict()
    results = {}
    errors = []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            out = []
            for r in range(20):
                out.append(m(inputs[(i + r) % 8]))
            results[i] = out
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        for r, y in enumerate(results[i]):
            np.testing.assert_array_equal(y, expected[(i + r) % 8])
    for k, v in state.items():
        np.testing.assert_array_equal(m.state_dict()[k], v)
    # backward refers to one of the calls as a whole (input and statistics together)
    x, save_mean, _, bn_training, *_ = m._saved
    assert any(x is inp for inp in inputs) and bn_training is False
