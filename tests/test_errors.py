"""Every error path of the contract: the exception type, its message, and that nothing was
written (running statistics, out and the input compare equal to copies taken before).

Each bad call is otherwise valid and in training with writable running statistics, so an
implementation that wrote before validating would be caught.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import cbn

C = 4


class State:
    """A valid set of arguments (float64, shape (5, 4, 3), C = 4) and copies to compare."""

    def __init__(self, dtype=np.float64, shape=(5, C, 3)):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape).astype(dtype)
        self.dy = rng.standard_normal(shape).astype(dtype)
        self.w = rng.uniform(0.5, 1.5, C).astype(dtype)
        self.b = rng.uniform(-1, 1, C).astype(dtype)
        self.rm = rng.uniform(-1, 1, C).astype(dtype)
        self.rv = rng.uniform(0.5, 2, C).astype(dtype)
        self.sm = rng.uniform(-1, 1, C).astype(dtype)
        self.si = rng.uniform(0.5, 2, C).astype(dtype)
        self.out = np.full(shape, 42.0, dtype)
        self._copies = {k: v.copy() for k, v in vars(self).items()
                        if isinstance(v, np.ndarray)}

    def assert_unchanged(self):
        for k, v in self._copies.items():
            np.testing.assert_array_equal(getattr(self, k), v, err_msg=f"{k} was modified")


def _forward(s, **kw):
    """batch_norm_forward with the valid arguments of ``s``, overridden by ``kw``."""
    args = dict(input=s.x, weight=s.w, bias=s.b, running_mean=s.rm, running_var=s.rv,
                training=True, momentum=0.1, eps=1e-5)
    args.update(kw)
    opts = {k: args.pop(k) for k in ("axis", "out", "n_threads") if k in args}
    return cbn.batch_norm_forward(args["input"], args["weight"], args["bias"],
                                  args["running_mean"], args["running_var"], args["training"],
                                  args["momentum"], args["eps"], **opts)


def _bn(s, **kw):
    """batch_norm (torch.nn.functional order) with the valid arguments of ``s``."""
    args = dict(input=s.x, running_mean=s.rm, running_var=s.rv, weight=s.w, bias=s.b,
                training=True, momentum=0.1, eps=1e-5, out=s.out)
    args.update(kw)
    return cbn.batch_norm(**args)


def _backward(s, **kw):
    args = dict(grad_output=s.dy, input=s.x, weight=s.w, save_mean=s.sm, save_invstd=s.si,
                training=True)
    args.update(kw)
    return cbn.batch_norm_backward(**args)


def _check(call, exc, match, dtype=np.float64, shape=(5, C, 3)):
    s = State(dtype, shape)
    with pytest.raises(exc, match=match):
        call(s)
    s.assert_unchanged()
    return s


# ------------------------------------------------------------------------------- ndim


@pytest.mark.parametrize("fn", [_forward, _bn])
@pytest.mark.parametrize("ndim", [0, 1, 6, 7])
def test_bad_ndim(fn, ndim):
    shape = (C,) if ndim == 1 else (2, C) + (2,) * (ndim - 2) if ndim > 1 else ()
    x = np.ones(shape)
    _check(lambda s: fn(s, input=x), ValueError,
           rf"expected 2D to 5D input \(got {ndim}D input\)")


@pytest.mark.parametrize("ndim", [1, 6])
def test_bad_ndim_backward(ndim):
    shape = (C,) if ndim == 1 else (2, C, 2, 2, 2, 2)
    x = np.ones(shape)
    _check(lambda s: _backward(s, input=x, grad_output=x), ValueError,
           rf"expected 2D to 5D input \(got {ndim}D input\)")


def test_bad_ndim_message_exact():
    with pytest.raises(ValueError) as info:
        cbn.batch_norm(np.ones(3), None, None, training=True)
    assert str(info.value) == "expected 2D to 5D input (got 1D input)"


# --------------------------------------------------------------------- channel counts


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [3, 5])
def test_forward_channel_mismatch(name, size, training):
    bad = np.ones(size)
    _check(lambda s: _forward(s, training=training, **{name: bad}), ValueError,
           rf"^{name} should contain {C} elements not {size}$")


def test_channel_mismatch_message_exact():
    x = np.ones((2, 4))
    with pytest.raises(ValueError) as info:
        cbn.batch_norm(x, np.zeros(3), np.ones(4), training=False)
    assert str(info.value) == "running_mean should contain 4 elements not 3"


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_channel_mismatch_list_in_eval(name):
    _check(lambda s: _forward(s, training=False, **{name: [1.0, 2.0, 3.0]}), ValueError,
           rf"{name} should contain {C} elements not 3")


@pytest.mark.parametrize("name", ["weight", "save_mean", "save_invstd"])
@pytest.mark.parametrize("size", [3, 8])
def test_backward_channel_mismatch(name, size):
    _check(lambda s: _backward(s, **{name: np.ones(size)}), ValueError,
           rf"^{name} should contain {C} elements not {size}$")


def test_channel_count_comes_from_axis():
    # (5, 4, 3) with axis=-1 has 3 channels: the 4-element parameters no longer fit
    _check(lambda s: _forward(s, axis=-1), ValueError, r"should contain 3 elements not 4")
    _check(lambda s: _backward(s, axis=2), ValueError, r"should contain 3 elements not 4")


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("value", [np.ones(C, complex), np.array(["a"] * C)])
def test_non_real_parameters(name, value):
    _check(lambda s: _forward(s, **{name: value}), TypeError, name)


# ---------------------------------------------------------------- one value / channel


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1), (1, C, 1, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    x = np.ones(shape)
    msg = ("Expected more than 1 value per channel when training, got input size "
           + str(shape).replace("(", r"\(").replace(")", r"\)"))
    _check(lambda s: _forward(s, input=x), ValueError, "^" + msg + "$")
    _check(lambda s: _bn(s, input=x, out=None), ValueError, msg)


def test_one_value_per_channel_message_exact():
    with pytest.raises(ValueError) as info:
        cbn.batch_norm(np.ones((1, 4)), None, None, training=True)
    assert str(info.value) == ("Expected more than 1 value per channel when training, "
                               "got input size (1, 4)")


def test_one_value_per_channel_channels_last():
    # axis -1 with one value per channel: (1, 1, 1, C)
    x = np.ones((1, 1, 1, C))
    _check(lambda s: _forward(s, input=x, axis=-1), ValueError,
           r"Expected more than 1 value per channel when training")


# --------------------------------------------------------------------- eps, momentum


@pytest.mark.parametrize("eps", [-1e-5, -0.0001, float("nan"), float("inf"), -float("inf"),
                                 np.float32(-1), np.float64("nan")])
def test_bad_eps(eps):
    _check(lambda s: _forward(s, eps=eps), ValueError, "eps")
    _check(lambda s: _bn(s, eps=eps), ValueError, "eps")
    _check(lambda s: _forward(s, eps=eps, training=False), ValueError, "eps")


@pytest.mark.parametrize("momentum", ["0.1", None, 1j, [0.1], np.array([0.1, 0.2])])
def test_bad_momentum(momentum):
    _check(lambda s: _forward(s, momentum=momentum), TypeError, "momentum")
    _check(lambda s: _bn(s, momentum=momentum), TypeError, "momentum")


# ------------------------------------------------------------------ eval needs stats


@pytest.mark.parametrize("missing", ["running_mean", "running_var", "both"])
def test_eval_without_running_stats(missing):
    kw = {"running_mean": None, "running_var": None} if missing == "both" else {missing: None}
    _check(lambda s: _forward(s, training=False, **kw), ValueError,
           "running_mean and running_var")
    _check(lambda s: _bn(s, training=False, **kw), ValueError, "running_mean and running_var")


# ------------------------------------------------------------------------------ dtypes


# float16 is left out: the contract listed it as a TypeError, but cbn.functional now
# computes half-precision inputs in float32 (a deliberate extension, tested elsewhere).
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.complex64, np.complex128, object, np.bool_]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=[np.dtype(d).name for d in BAD_DTYPES])
def test_bad_input_dtype(dtype):
    x = np.ones((5, C, 3), dtype=dtype)
    name = np.dtype(dtype).name
    _check(lambda s: _forward(s, input=x), TypeError, name)
    _check(lambda s: _bn(s, input=x, out=None), TypeError, name)
    _check(lambda s: _backward(s, input=x), TypeError, name)
    _check(lambda s: _backward(s, grad_output=x), TypeError, name)


def test_integer_list_input_is_rejected():
    _check(lambda s: _forward(s, input=[[1, 2, 3, 4], [5, 6, 7, 8]]), TypeError, "int")


# ------------------------------------------------------------------------------- axis


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_axis_out_of_range(axis):
    assert issubclass(np.exceptions.AxisError, ValueError)
    _check(lambda s: _forward(s, axis=axis), np.exceptions.AxisError, "axis")
    _check(lambda s: _bn(s, axis=axis), ValueError, "axis")
    _check(lambda s: _backward(s, axis=axis), np.exceptions.AxisError, "axis")


# -------------------------------------------------------------------------------- out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_wrong_shape(training):
    for bad in (np.zeros((5, C, 4)), np.zeros((5, C)), np.zeros((3, C, 5))):
        _check(lambda s: _forward(s, training=training, out=bad), ValueError, "out")
        assert (bad == 0).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_wrong_dtype(training):
    bad = np.zeros((5, C, 3), np.float32)
    _check(lambda s: _forward(s, training=training, out=bad), ValueError, "out")
    assert (bad == 0).all()
    # float32 input, float64 out
    bad = np.zeros((5, C, 3), np.float64)
    _check(lambda s: _forward(s, training=training, out=bad), ValueError, "out",
           dtype=np.float32)
    assert (bad == 0).all()


def test_out_read_only():
    bad = np.zeros((5, C, 3))
    bad.setflags(write=False)
    _check(lambda s: _forward(s, out=bad), ValueError, "out")


def test_out_not_an_array():
    _check(lambda s: _forward(s, out=[[0.0] * 3] * C * 5), TypeError, "out")


def test_out_is_input_but_call_invalid():
    # out=input with an invalid argument: the input is not overwritten
    def call(s):
        _forward(s, out=s.x, eps=-1.0)
    _check(call, ValueError, "eps")


# ------------------------------------------------------------------------ grad_output


@pytest.mark.parametrize("shape", [(5, C, 4), (5, C), (C, 5, 3), (1, 5, C, 3)])
def test_grad_output_shape_mismatch(shape):
    _check(lambda s: _backward(s, grad_output=np.ones(shape)), ValueError, "grad_output")


# --------------------------------------------------------------- running stats (train)


RUNNING = {"running_mean": "rm", "running_var": "rv"}


@pytest.mark.parametrize("name", list(RUNNING))
def test_running_stat_wrong_dtype_in_training(name):
    _check(lambda s: _forward(s, **{name: getattr(s, RUNNING[name]).astype(np.float32)}),
           TypeError, name)
    _check(lambda s: _forward(s, **{name: np.zeros(C, np.float64)}), TypeError, name,
           dtype=np.float32)


@pytest.mark.parametrize("name", list(RUNNING))
def test_running_stat_not_ndarray_in_training(name):
    _check(lambda s: _forward(s, **{name: [0.0] * C}), TypeError, name)
    _check(lambda s: _bn(s, **{name: (0.0,) * C}), TypeError, name)


@pytest.mark.parametrize("name", list(RUNNING))
def test_running_stat_read_only_in_training(name):
    def call(s):
        a = getattr(s, RUNNING[name]).copy()
        a.setflags(write=False)
        _forward(s, **{name: a})
    _check(call, TypeError, name)


def test_bad_running_var_leaves_running_mean_alone():
    # running_mean valid and writable, running_var invalid: the mean is not updated
    for bad, exc in ((np.zeros(C, np.float32), TypeError), (np.zeros(3), ValueError),
                     ([1.0] * C, TypeError)):
        _check(lambda s: _forward(s, running_var=bad), exc, "running_var")


def test_bad_weight_leaves_running_stats_alone():
    _check(lambda s: _forward(s, weight=np.ones(C + 1)), ValueError, "weight")
    _check(lambda s: _forward(s, bias=np.ones((2, 3))), ValueError, "bias")


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize("n", [0, -1])
def test_bad_n_threads(n):
    _check(lambda s: _forward(s, n_threads=n), ValueError, "n_threads")
    _check(lambda s: _bn(s, n_threads=n), ValueError, "n_threads")
    _check(lambda s: _backward(s, n_threads=n), ValueError, "n_threads")
    # the same on an input big enough to run parallel
    big = (64, C, 256)
    _check(lambda s: _forward(s, n_threads=n), ValueError, "n_threads", shape=big)


def test_bad_n_threads_type():
    _check(lambda s: _forward(s, n_threads=1.5), TypeError, "n_threads")


@pytest.mark.parametrize("n, exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                    ("2", TypeError)])
def test_bad_set_num_threads(n, exc):
    cbn.set_num_threads(2)
    with pytest.raises(exc):
        cbn.set_num_threads(n)
    assert cbn.get_num_threads() == 2         # the setting is unchanged


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32", "complex64", "V2", "object"])
def test_eval_parameters_refuses_dtypes_it_cannot_compute_in(dtype):
    # Once, a float16 dtype here made the kernel write doubles into 2-byte arrays (heap
    # corruption: the process aborted some calls later). Run in a child, so that a
    # regression shows as a failed test rather than a dead test session.
    code = ("import numpy as np\n"
            "from cbn.functional import eval_parameters\n"
            "try:\n"
            "    import ml_dtypes\n"
            "except ImportError:\n"
            "    ml_dtypes = None\n"
            f"dt = {dtype!r}\n"
            "if dt == 'bfloat16':\n"
            "    dt = ml_dtypes.bfloat16 if ml_dtypes else np.float16\n"
            "for _ in range(50):\n"
            "    try:\n"
            "        eval_parameters(np.ones(37), None, np.ones(37), 1e-5, dt)\n"
            "    except TypeError as e:\n"
            "        msg = str(e)\n"
            "    else:\n"
            "        raise SystemExit('accepted')\n"
            "    [bytearray(1000) for _ in range(100)]\n"
            "print(msg)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, MALLOC_CHECK_="3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("dtype must be float32 or float64, got "), r.stdout
