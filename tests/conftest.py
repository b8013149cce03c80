"""Shared helpers for cbn's tests: cases, data, layouts and dtype-derived tolerances.

The oracle everywhere is :mod:`cbn._reference` (plain NumPy in float64, cast once to the
input's dtype), finite differences (tests/test_gradients.py) and PyTorch
(tests/test_torch_parity.py). Nothing here holds values copied from the code under test.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import cbn

# Hypothesis profiles (tests/test_properties.py): "ci", the default, is fixed (derandomized)
# and quick; CBN_HYPOTHESIS_PROFILE=soak runs many more random examples.
try:
    from hypothesis import HealthCheck, settings
except ImportError:                                  # the property tests skip
    pass
else:
    settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None,
                              print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("soak", max_examples=20000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("CBN_HYPOTHESIS_PROFILE", "ci"))

DTYPES = [np.float32, np.float64]

# (shape, channel axis): 2D to 5D, channels first (axis 1) and channels last (axis -1), and
# a few other valid axes. The channels-last shapes are the NCHW ones with C moved to the
# end, so both kernel shapes (planes: large K, rows: K == 1) see the same sizes. No axis has
# size 1, so the memory order of an array (axes by decreasing |stride|) is unambiguous.
CASES = [
    ((6, 3), 1),
    ((6, 3), -1),            # 2D: the last axis is axis 1, spelled negatively
    ((5, 4), 0),             # channel axis first: M == 1
    ((4, 5, 7), 1),
    ((4, 7, 5), -1),
    ((3, 4, 5, 6), 1),
    ((3, 5, 6, 4), -1),
    ((3, 4, 5, 6), 2),       # a middle axis: M and K both > 1
    ((2, 3, 4, 3, 5), 1),
    ((2, 4, 3, 5, 3), -1),
]


def case_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-ax{axis}"


CASE_IDS = [case_id(c) for c in CASES]


def n_per_channel(shape, axis):
    """Number of values that share one channel (the n of the statistics)."""
    C = shape[axis]
    return math.prod(shape) // C if C else 0


def channel_shape(ndim, axis):
    """Shape that broadcasts a (C,) vector along ``axis`` of an ndim array."""
    s = [1] * ndim
    s[axis % ndim] = -1
    return tuple(s)


# ----------------------------------------------------------------------------- data


def make_input(shape, axis, dtype, seed=0):
    """Random input whose channels have different means (-3..3) and spreads (0.5..2)."""
    rng = np.random.default_rng(seed)
    C = shape[axis]
    cs = channel_shape(len(shape), axis)
    mean = rng.uniform(-3.0, 3.0, C).reshape(cs)
    std = rng.uniform(0.5, 2.0, C).reshape(cs)
    return (rng.standard_normal(shape) * std + mean).astype(dtype)


def make_params(C, dtype, seed=1):
    """(weight, bias, running_mean, running_var) of C values each, all in ``dtype``."""
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C)
    bias = rng.uniform(-1.0, 1.0, C)
    running_mean = rng.uniform(-1.0, 1.0, C)
    running_var = rng.uniform(0.5, 2.0, C)
    return tuple(a.astype(dtype) for a in (weight, bias, running_mean, running_var))


# --------------------------------------------------------------------------- layouts


def _moveaxis_layout(x, src_axis):
    """``x``'s values stored with ``src_axis`` innermost, viewed in ``x``'s axis order."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, src_axis, -1)), -1, src_axis)


def channels_last(x):
    """PyTorch's channels_last (NCHW viewed on NHWC memory), for any ndim >= 3."""
    return _moveaxis_layout(x, 1)


def strided_variants(x):
    """Dict name -> array with the same shape and values as ``x`` but other strides.

    ``C``: contiguous; ``F``: Fortran order (every axis transposed); ``sliced``: every other
    element of the last axis of a larger array (``base[..., ::2]``); ``sliced_outer``: every
    third slab of axis 0; ``negative``: negative strides on the last axis
    (``base[..., ::-1]``); ``reversed``: negative strides on every axis; ``channels_last``
    (ndim >= 3): PyTorch's channels_last,
    ``np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)`` in 4D;
    ``rolled``: contiguous in the axis order (ndim-1, 0, 1, ...), another permutation.
    """
    x = np.asarray(x)
    out = {"C": np.ascontiguousarray(x), "F": np.asfortranarray(x)}

    base = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    base[..., ::2] = x
    out["sliced"] = base[..., ::2]

    base = np.zeros((3 * x.shape[0],) + x.shape[1:], dtype=x.dtype)
    base[::3] = x
    out["sliced_outer"] = base[::3]

    out["negative"] = np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    rev = (slice(None, None, -1),) * x.ndim
    out["reversed"] = np.ascontiguousarray(x[rev])[rev]

    if x.ndim >= 3:
        out["channels_last"] = channels_last(x)
    order = (x.ndim - 1,) + tuple(range(x.ndim - 1))
    out["rolled"] = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))

    for name, v in out.items():
        assert v.shape == x.shape and np.array_equal(v, x), name
    return out


LAYOUTS = ["C", "F", "sliced", "sliced_outer", "negative", "reversed", "channels_last",
           "rolled"]


def case_layouts(cases=CASES):
    """pytest params (case, layout name) for every layout that exists at the case's ndim."""
    return [pytest.param(case, lay, id=f"{case_id(case)}-{lay}")
            for case in cases for lay in LAYOUTS
            if lay != "channels_last" or len(case[0]) >= 3]


def layout(x, name):
    """One of :func:`strided_variants`; skips the test if it does not exist for x.ndim."""
    variants = strided_variants(x)
    if name not in variants:
        pytest.skip(f"layout {name} needs ndim >= 3")
    return variants[name]


def read_only(x):
    """A read-only copy of ``x``."""
    r = np.array(x, copy=True)
    r.setflags(write=False)
    return r


def memory_order(a):
    """Axes of ``a`` from the largest |stride| to the smallest (ties keep axis order)."""
    return tuple(sorted(range(a.ndim), key=lambda i: (-abs(a.strides[i]), i)))


def is_dense_in_order(a, order):
    """True if ``a`` is one C-contiguous block when its axes are taken in ``order``."""
    return a.transpose(order).flags.c_contiguous


# ------------------------------------------------------------------------ tolerances
#
# The oracle is exact float64 arithmetic rounded once to the output dtype, so every bound
# below is a multiple of that dtype's unit roundoff eps = np.finfo(dtype).eps:
#
# * Element-wise outputs (y, grad_input, save_mean, save_invstd, running stats) depend on
#   per-channel statistics reduced over n values. A sum of n rounded terms has an error
#   that grows like eps * sqrt(n) in the usual random-walk model (blocked / pairwise
#   summation, as cbn does, only does better); the normalize step itself adds a handful of
#   roundings (subtract, scale, shift, final cast: a few eps). Normalized values are O(1)
#   for our data, so the bound is TOL_FACTOR * eps * (1 + sqrt(n)) relative to the size of
#   the array (atol scaled by max|expected|, or by an explicit scale) and to each element
#   (rtol). With TOL_FACTOR = 4 this is ~5e-6 relative for float32 with n ~ 100, tight
#   enough that any formula slip (n vs n - 1 in the variance, a missing eps, a wrong
#   channel) fails by orders of magnitude.
# * Per-channel sums (grad_weight, grad_bias) of n terms t_i: recursive summation errs by
#   ~ eps * sum_k |S_k| ~ eps * sqrt(n) * ||t||_2 (partial sums S_k grow like sqrt(k) for
#   random terms), so atol per channel = TOL_FACTOR * eps * (1 + sqrt(n)) * ||t||_2, with
#   ||t||_2 computed from the float64 oracle's own terms.
#
# Comparisons between two inexact implementations (cbn and PyTorch) allow the sum of both
# errors: ``factor=2``.

TOL_FACTOR = 4.0


def rel_tol(dtype, n, factor=1.0):
    eps = float(np.finfo(dtype).eps)
    return factor * TOL_FACTOR * eps * (1.0 + math.sqrt(max(n, 1)))


def _finite_max_abs(a):
    a = np.asarray(a, dtype=np.float64)
    f = a[np.isfinite(a)]
    return float(np.max(np.abs(f))) if f.size else 0.0


def assert_close(actual, expected, dtype, n, *, scale=None, factor=1.0, err_msg=""):
    """``actual`` (cbn, in ``dtype``) against ``expected`` (an oracle) with the element-wise
    bound above. ``scale`` sets the absolute part: a number, or an array that broadcasts
    against the values (e.g. per channel, see :func:`forward_scale`); by default
    max(1, max|expected|). NaNs must match NaNs."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    t = rel_tol(dtype, n, factor)
    if scale is None:
        scale = max(1.0, _finite_max_abs(expected))
    a = actual.astype(np.float64)
    bound = t * np.asarray(scale, dtype=np.float64) + t * np.abs(expected)
    with np.errstate(invalid="ignore"):
        ok = (np.abs(a - expected) <= bound) | (np.isnan(a) & np.isnan(expected)) | (
            a == expected)
    if not ok.all():
        bad = ~ok
        bound = np.broadcast_to(bound, a.shape)
        idx = np.argwhere(bad)[:5]
        lines = [f"  at {tuple(int(i) for i in j)}: actual {a[tuple(j)]!r}, expected "
                 f"{expected[tuple(j)]!r}, bound {bound[tuple(j)]:.3g}" for j in idx]
        raise AssertionError(f"{err_msg}: {int(bad.sum())} of {a.size} values differ beyond "
                             f"rtol={t:.3g} (n={n}, dtype={np.dtype(dtype).name})\n"
                             + "\n".join(lines))


def forward_scale(x, axis, save_invstd, weight=None, bias=None):
    """Per-channel absolute scale for a forward output y = (x - mean) * invstd * w + b.

    The mean is a sum of values up to max|x_c| in size, so its error is relative to
    max|x_c|, not to the spread: it reaches y multiplied by |w_c| * invstd_c. A channel
    with a large offset and a small spread (max|x_c| * invstd_c >> 1) is ill-conditioned
    for any implementation, the oracle's float64 mean included; the bound says so.
    Returns an array shaped to broadcast along ``axis``.
    """
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[axis]
    xm = np.abs(np.moveaxis(x, axis, -1)).reshape(-1, C)
    xmax = xm.max(axis=0, initial=0.0, where=np.isfinite(xm))
    w = np.ones(C) if weight is None else np.abs(np.asarray(weight, np.float64))
    b = np.zeros(C) if bias is None else np.abs(np.asarray(bias, np.float64))
    s = np.abs(np.asarray(save_invstd, np.float64))
    s = np.where(np.isfinite(s), s, 0.0)
    return (w * s * xmax + b + 1e-300).reshape(channel_shape(x.ndim, axis))


def assert_close_sums(actual, expected, terms, axis, dtype, *, factor=1.0, err_msg=""):
    """Per-channel sums: ``actual[c]`` against ``expected[c]`` where the exact sum is over
    ``terms`` (float64, the input's shape) along every axis but ``axis``; the absolute
    bound per channel scales with the 2-norm of that channel's terms."""
    terms = np.moveaxis(np.asarray(terms, dtype=np.float64), axis, -1)
    C = terms.shape[-1]
    terms = terms.reshape(-1, C)
    n = terms.shape[0]
    t = rel_tol(dtype, n, factor)
    norm = np.sqrt((terms ** 2).sum(axis=0))
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape == (C,), (actual.shape, expected.shape)
    err = np.abs(actual - expected)
    bound = t * np.maximum(norm, 1.0) + t * np.abs(expected)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{err_msg}: per-channel sums differ beyond the bound\n"
                           f"actual   {actual[bad]}\nexpected {expected[bad]}\n"
                           f"error    {err[bad]}\nbound    {bound[bad]}")


def grad_input_scale(weight, save_invstd, grad_output, xhat):
    """Size of the terms that make up grad_input, for the absolute part of its bound:
    |w| * invstd * |dy| * (1 + |xhat|) bounds |dy|, |mean(dy)| and |xhat * mean(dy*xhat)|
    (the mean terms are averages of |dy| and |dy| * |xhat|)."""
    w = 1.0 if weight is None else np.max(np.abs(np.asarray(weight, np.float64)))
    s = np.max(np.abs(np.asarray(save_invstd, np.float64)), initial=0.0)
    dy = _finite_max_abs(grad_output)
    xh = _finite_max_abs(xhat)
    return max(1.0, float(w * s * dy * (1.0 + xh)))


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _reset_thread_override():
    """No test leaks a cbn.set_num_threads override into the next one."""
    yield
    cbn.set_num_threads(None)
