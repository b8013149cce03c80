"""cbn's modules against torch.nn.BatchNorm{1,2,3}d over sequences of training and eval calls:
outputs, running statistics, num_batches_tracked, input and parameter gradients (torch
autograd), state_dict exchange in both directions, reprs and error messages."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

import cbn

torch = pytest.importorskip("torch")

CASES = [("BatchNorm1d", (8, 5)), ("BatchNorm1d", (4, 5, 7)), ("BatchNorm2d", (3, 5, 4, 6)),
         ("BatchNorm3d", (2, 5, 3, 4, 2))]
TOL = {np.float32: dict(rtol=3e-5, atol=3e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def _data(rng, shape, dtype):
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    shift = rng.uniform(-4, 4, C).reshape(bshape)
    scale = rng.uniform(0.3, 3, C).reshape(bshape)
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


def _pair(name, C, dtype, rng, **kwargs):
    """A cbn module and a torch module with the same random weight and bias."""
    m = getattr(cbn, name)(C, dtype=dtype, **kwargs)
    t = getattr(torch.nn, name)(C, **kwargs).to(TORCH_DTYPE[dtype])
    if m.affine:
        w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype)
        m.weight[:] = w
        m.bias[:] = b
        with torch.no_grad():
            t.weight.copy_(torch.from_numpy(w))
            t.bias.copy_(torch.from_numpy(b))
    return m, t


def _close(a, b, tol, what):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy() if hasattr(b, "detach") else b,
                               err_msg=what, **tol)


def _compare_state(m, t, tol, step):
    if t.track_running_stats:
        _close(m.running_mean, t.running_mean, tol, f"running_mean, step {step}")
        _close(m.running_var, t.running_var, tol, f"running_var, step {step}")
        assert m.num_batches_tracked == int(t.num_batches_tracked), step
    else:
        assert m.running_mean is None and m.num_batches_tracked is None
    if t.affine:
        _close(m.grad_weight, t.weight.grad, tol, f"grad_weight, step {step}")
        _close(m.grad_bias, t.bias.grad, tol, f"grad_bias, step {step}")
    else:
        assert m.grad_weight is None and m.grad_bias is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("name, shape", CASES)
def test_sequence_of_training_and_eval_calls(name, shape, momentum, affine, track, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((name, shape, momentum, affine, track)).encode()))
    tol = TOL[dtype]
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track)
    m, t = _pair(name, shape[1], dtype, rng, **kwargs)
    modes = ["train", "train", "eval", "train", "eval", "eval", "train"]
    for step, mode in enumerate(modes):
        m.train(mode == "train")
        t.train(mode == "train")
        x = _data(rng, shape, dtype)
        xt = torch.from_numpy(x.copy()).requires_grad_()
        y = m(x)
        yt = t(xt)
        _close(y, yt, tol, f"output, step {step} ({mode})")
        g1 = rng.standard_normal(shape).astype(dtype)
        if step in (1, 4):
            # two backward calls for one forward: input and parameter grads accumulate
            g2 = rng.standard_normal(shape).astype(dtype)
            yt.backward(torch.from_numpy(g1), retain_graph=True)
            yt.backward(torch.from_numpy(g2))
            dx = m.backward(g1) + m.backward(g2)
        else:
            yt.backward(torch.from_numpy(g1))
            dx = m.backward(g1)
        _close(dx, xt.grad, tol, f"grad_input, step {step} ({mode})")
        # parameter grads accumulate over the steps on both sides (no zero_grad)
        _compare_state(m, t, tol, step)
    m.zero_grad()
    t.zero_grad()
    assert m.grad_weight is None and (t.weight is None or t.weight.grad is None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_against_torch_nchw(dtype):
    rng = np.random.default_rng(3)
    m, t = _pair("BatchNorm2d", 6, dtype, rng, momentum=0.2)
    m.axis = -1
    for mode in ("train", "train", "eval"):
        m.train(mode == "train")
        t.train(mode == "train")
        x = _data(rng, (4, 6, 5, 3), dtype)
        xt = torch.from_numpy(x).requires_grad_()
        yt = t(xt)
        y = m(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        _close(y.transpose(0, 3, 1, 2), yt, TOL[dtype], mode)
        g = rng.standard_normal(x.shape).astype(dtype)
        yt.backward(torch.from_numpy(g))
        dx = m.backward(np.ascontiguousarray(g.transpose(0, 2, 3, 1)))
        _close(dx.transpose(0, 3, 1, 2), xt.grad, TOL[dtype], mode)
        _compare_state(m, t, TOL[dtype], mode)


@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("name, shape", CASES)
def test_load_torch_state_dict_reproduces_eval(name, shape, affine, track):
    rng = np.random.default_rng(11)
    C = shape[1]
    t = getattr(torch.nn, name)(C, momentum=0.3, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            t.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, C)))
            t.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, C)))
        for _ in range(3):
            t(torch.from_numpy(_data(rng, shape, np.float32)))
    t.eval()
    m = getattr(cbn, name)(C, momentum=0.3, affine=affine, track_running_stats=track)
    m.load_state_dict(t.state_dict())                 # torch tensors
    m.eval()
    if track:
        assert m.num_batches_tracked == 3
    x = _data(rng, shape, np.float32)
    with torch.no_grad():
        expected = t(torch.from_numpy(x))
    _close(m(x), expected, TOL[np.float32], "eval output after loading")


def test_load_torch_parameters_with_requires_grad_and_float64():
    t = torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        t.weight.mul_(2)
        t.running_var.fill_(4)
    m = cbn.BatchNorm1d(3)                            # float32: values are converted
    m.load_state_dict({"weight": t.weight, "bias": t.bias, "running_mean": t.running_mean,
                       "running_var": t.running_var,
                       "num_batches_tracked": t.num_batches_tracked})
    assert m.weight.dtype == np.float32
    np.testing.assert_array_equal(m.weight, 2)
    np.testing.assert_array_equal(m.running_var, 4)


@pytest.mark.parametrize("name, shape", CASES)
def test_torch_loads_cbn_state_dict(name, shape):
    rng = np.random.default_rng(5)
    m = getattr(cbn, name)(shape[1], momentum=None)
    m.weight[:] = rng.uniform(0.5, 2, shape[1])
    for _ in range(2):
        m(_data(rng, shape, np.float32))
    t = getattr(torch.nn, name)(shape[1], momentum=None)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    assert t.num_batches_tracked.dtype == torch.int64 and int(t.num_batches_tracked) == 2
    m.eval()
    t.eval()
    x = _data(rng, shape, np.float32)
    with torch.no_grad():
        _close(m(x), t(torch.from_numpy(x)), TOL[np.float32], "eval")
    m.train()
    t.train()
    with torch.no_grad():
        _close(m(x), t(torch.from_numpy(x)), TOL[np.float32], "train (momentum None)")
    _close(m.running_mean, t.running_mean, TOL[np.float32], "running_mean")


@pytest.mark.parametrize("kwargs", [{}, {"eps": 0.0, "momentum": None},
                                    {"affine": False, "track_running_stats": False},
                                    {"eps": 1e-3, "momentum": 0.3}])
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_repr_matches_torch(name, kwargs):
    # Recent PyTorch (2.13) added a ``bias=`` argument and shows it in the repr; cbn keeps the
    # classic form (no separate bias switch), so that one field is left out of the comparison.
    theirs = re.sub(r", bias=(True|False)", "", repr(getattr(torch.nn, name)(64, **kwargs)))
    assert repr(getattr(cbn, name)(64, **kwargs)) == theirs


@pytest.mark.parametrize("name, shape", [("BatchNorm1d", (2, 3, 4, 5)), ("BatchNorm1d", (3,)),
                                         ("BatchNorm2d", (2, 3, 4)),
                                         ("BatchNorm3d", (2, 3, 4, 5))])
def test_ndim_error_messages_match_torch(name, shape):
    with pytest.raises(ValueError) as theirs:
        getattr(torch.nn, name)(3)(torch.ones(shape))
    with pytest.raises(ValueError) as ours:
        getattr(cbn, name)(3)(np.ones(shape, np.float32))
    assert str(ours.value) == str(theirs.value)


def test_one_value_per_channel_message_matches_torch():
    with pytest.raises(ValueError) as theirs:
        torch.nn.BatchNorm1d(4)(torch.ones(1, 4))
    with pytest.raises(ValueError) as ours:
        cbn.BatchNorm1d(4)(np.ones((1, 4), np.float32))
    assert str(ours.value) == str(theirs.value).replace("torch.Size([1, 4])", "(1, 4)")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_load_torch_state_dict_with_unconvertible_tensor_changes_nothing():
    m = cbn.BatchNorm1d(3)
    d = {k: torch.from_numpy(v) for k, v in m.state_dict().items()}
    d["weight"] = torch.full((3,), 2.0)
    d["bias"] = torch.ones(3, dtype=torch.complex32)         # NumPy has no complex32
    with pytest.raises(TypeError, match="state_dict\\['bias'\\]: cannot convert"):
        m.load_state_dict(d)
    np.testing.assert_array_equal(m.weight, 1)


def test_tracking_switched_off_after_construction_like_torch():
    rng = np.random.default_rng(2)
    m, t = _pair("BatchNorm1d", 4, np.float64, rng, momentum=0.3)
    for mode in ("train", "off", "train", "eval"):
        if mode == "off":
            m.track_running_stats = t.track_running_stats = False
            continue
        m.train(mode == "train")
        t.train(mode == "train")
        x = _data(rng, (6, 4), np.float64)
        with torch.no_grad():
            _close(m(x), t(torch.from_numpy(x)), TOL[np.float64], mode)
        _close(m.running_mean, t.running_mean, TOL[np.float64], mode)
        assert m.num_batches_tracked == int(t.num_batches_tracked) == 1
