"""Property tests: random calls against the float64 reference (and PyTorch where installed).

Random ndim 2..5, shapes with size-0 and size-1 axes, any channel axis, any memory layout
(axis permutations, Fortran order, every-other-element slices, negative steps), all dtypes,
weight/bias/running statistics present or not, training and eval, momentum, eps, out=
(a new array in another layout, or the input itself), n_threads 1..3; the backward on the
same draw; and the modules' cumulative average (momentum=None) over several batches.

The hypothesis profile comes from tests/conftest.py: "ci" (fixed, quick) by default,
CBN_HYPOTHESIS_PROFILE=soak for a long random run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, strategies as st  # noqa: E402

import cbn  # noqa: E402
from cbn import _reference as ref  # noqa: E402

from conftest import (assert_close, assert_close_sums, channel_shape,  # noqa: E402
                      forward_scale, grad_input_scale)

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
try:
    import ml_dtypes
    DTYPES.append(np.dtype(ml_dtypes.bfloat16))
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:                                   # optional
    ml_dtypes = None
    _BF16 = None

try:
    import torch
except ImportError:                                   # optional
    torch = None


def _compute(dtype):
    """The dtype cbn computes and returns statistics in (half types: float32)."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _tol(dtype):
    """(dtype, factor) for conftest's bounds on an output stored in ``dtype``: np.finfo
    does not know bfloat16, whose unit roundoff (2**-7) is 8 times float16's."""
    if _BF16 is not None and dtype == _BF16:
        return np.dtype(np.float16), 8.0
    return dtype, 1.0


@st.composite
def arrays(draw, shape, dtype, seed, offsets=True):
    """An array of ``shape`` in a random memory layout, with random per-channel data."""
    ndim = len(shape)
    perm = draw(st.permutations(range(ndim)))
    steps = draw(st.lists(st.sampled_from([1, 1, 2, -1]), min_size=ndim, max_size=ndim))
    full = [n * abs(s) for n, s in zip(shape, steps)]
    base = np.zeros([full[p] for p in perm], dtype=dtype).transpose(np.argsort(perm))
    x = base[tuple(slice(None, None, s) for s in steps)]
    assert x.shape == tuple(shape)
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    if offsets and ndim:
        values = values * rng.uniform(0.5, 2.0) + rng.uniform(-3, 3)
    x[...] = values.astype(dtype)
    note(f"layout: perm={perm} steps={steps} strides={x.strides}")
    return x


@st.composite
def calls(draw):
    ndim = draw(st.integers(2, 5))
    dims = st.one_of(st.integers(0, 4), st.integers(1, 4), st.integers(5, 40))
    shape = tuple(draw(st.lists(dims, min_size=ndim, max_size=ndim)))
    if math.prod(shape) > 20000:                    # keep examples quick
        shape = tuple(min(n, 6) for n in shape)
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    x = draw(arrays(shape, dtype, seed))
    C = shape[axis]
    cd = _compute(dtype)
    rng = np.random.default_rng(seed + 1)
    affine = draw(st.sampled_from(["none", "weight", "bias", "both"]))
    w = rng.uniform(0.5, 1.5, C).astype(cd) if affine in ("weight", "both") else None
    b = rng.uniform(-1, 1, C).astype(cd) if affine in ("bias", "both") else None
    training = draw(st.booleans())
    running = (not training) or draw(st.booleans())
    rm = rng.uniform(-1, 1, C).astype(cd) if running else None
    rv = rng.uniform(0.5, 2, C).astype(cd) if running else None
    return dict(
        x=x, axis=axis, w=w, b=b, rm=rm, rv=rv, training=training,
        momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.0])),
        out=draw(st.sampled_from([None, "new", "inplace"])),
        out_layout=draw(arrays(shape, dtype, 0, offsets=False)),
        n_threads=draw(st.sampled_from([None, 1, 2, 3])),
        dy=draw(arrays(shape, dtype, seed + 2)),
    )


def _n(shape, axis):
    C = shape[axis]
    return math.prod(shape) // C if C else 0


@given(calls())
def test_forward_and_backward_match_reference(call):
    x, axis, dtype = call["x"], call["axis"], call["x"].dtype
    C, n, cd = x.shape[axis], _n(x.shape, axis), _compute(dtype)
    w, b, training, momentum, eps = (call[k] for k in ("w", "b", "training", "momentum",
                                                       "eps"))
    x0 = x.copy()
    rm0 = None if call["rm"] is None else call["rm"].copy()
    rv0 = None if call["rv"] is None else call["rv"].copy()
    rm, rv = call["rm"], call["rv"]
    out = {None: None, "new": call["out_layout"], "inplace": x}[call["out"]]
    kw = dict(axis=axis, out=out, n_threads=call["n_threads"])

    if training and math.prod(x.shape[:axis % x.ndim] + x.shape[axis % x.ndim + 1:]) == 1:
        # as PyTorch: also when C == 0
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            cbn.batch_norm_forward(x, w, b, rm, rv, training, momentum, eps, **kw)
        np.testing.assert_array_equal(x, x0)
        return

    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, training, momentum, eps, **kw)
    assert y.shape == x.shape and y.dtype == dtype
    assert sm.shape == si.shape == (C,) and sm.dtype == si.dtype == cd
    if out is not None:
        assert y is out
    if x.size == 0:
        # nothing to normalize: running statistics untouched
        for a, a0 in ((rm, rm0), (rv, rv0)):
            if a is not None:
                np.testing.assert_array_equal(a, a0)
        return

    erm, erv = (None if a is None else a.astype(np.float64) for a in (rm0, rv0))
    with np.errstate(all="ignore"):
        # half inputs: the reference on their (exact) float32 values returns float32
        # statistics, as cbn does
        ey, esm, esi = ref.batch_norm_forward(x0.astype(cd), w, b, erm, erv, training,
                                              momentum, eps, axis=axis)
    tol, f = _tol(dtype)
    assert_close(y, ey, tol, n, scale=forward_scale(x0, axis, esi, w, b), factor=f,
                 err_msg="y")
    assert_close(sm, esm, cd, n, scale=forward_scale(x0, axis, np.ones(C)).ravel(),
                 err_msg="save_mean")
    assert_close(si, esi, cd, n, err_msg="save_invstd")
    if rm is not None:
        assert_close(rm, erm, cd, n, err_msg="running_mean")
        assert_close(rv, erv, cd, n, err_msg="running_var")
    if out is not x:
        np.testing.assert_array_equal(x, x0)             # the input is not touched

    if (torch is not None and dtype in (np.float32, np.float64)
            and (eps > 0 or not training)):              # torch refuses eps = 0 there
        _check_torch(x0, call, y, esi)

    # the backward of the same call, from cbn's own saved statistics
    dy = call["dy"]
    gx, gw, gb = cbn.batch_norm_backward(dy, x0, w, sm, si, training, axis=axis,
                                         n_threads=call["n_threads"])
    assert gx.shape == x.shape and gx.dtype == dtype and gw.dtype == gb.dtype == cd
    egx, egw, egb = ref.batch_norm_backward(dy.astype(cd), x0.astype(cd), w, sm, si,
                                            training, axis=axis)
    cs = channel_shape(x.ndim, axis)
    xhat = ((x0.astype(np.float64) - sm.astype(np.float64).reshape(cs))
            * si.astype(np.float64).reshape(cs))
    assert_close(gx, egx, tol, n, scale=grad_input_scale(w, si, dy, xhat), factor=f,
                 err_msg="grad_input")
    terms = np.abs(dy.astype(np.float64)) * (1.0 + np.abs(xhat))
    assert_close_sums(gw, egw, terms, axis, cd, err_msg="grad_weight")
    assert_close_sums(gb, egb, terms, axis, cd, err_msg="grad_bias")


def _check_torch(x0, call, y, esi):
    """y against torch.nn.functional.batch_norm on the same values (running statistics
    are compared with the reference: in training torch gets none)."""
    axis = call["axis"] % x0.ndim
    training = call["training"]
    t = lambda a: None if a is None else torch.from_numpy(np.array(a))  # noqa: E731
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x0, axis, 1)))
    yt = torch.nn.functional.batch_norm(xt, None if training else t(call["rm"]),
                                        None if training else t(call["rv"]),
                                        t(call["w"]), t(call["b"]), training,
                                        call["momentum"], call["eps"])
    yt = np.moveaxis(yt.numpy(), 1, axis)
    assert_close(y, yt, x0.dtype, _n(x0.shape, axis),
                 scale=forward_scale(x0, axis, esi, call["w"], call["b"]), factor=2,
                 err_msg="y against torch")


@st.composite
def module_runs(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.sampled_from([1, -1]))
    if _n(shape, axis) < 2:
        shape = (2,) + shape[1:] if shape[0] == 1 else shape
        if _n(shape, axis) < 2:
            shape = (shape[0] + 1,) + shape[1:]
    return dict(shape=shape, axis=axis,
                momentum=draw(st.sampled_from([None, 0.1, 0.9])),
                batches=draw(st.integers(1, 4)),
                dtype=draw(st.sampled_from([np.float32, np.float64])),
                seed=draw(st.integers(0, 2 ** 32 - 1)))


@given(module_runs())
def test_module_running_stats_match_reference(run):
    """BatchNorm over several batches, momentum None (cumulative average) or a float,
    against the reference update with PyTorch's factor (1/num_batches_tracked for None)."""
    shape, axis, dtype, momentum = run["shape"], run["axis"], run["dtype"], run["momentum"]
    C = shape[axis]
    bn = cbn.BatchNorm(C, momentum=momentum, dtype=dtype, axis=axis)
    rm, rv = np.zeros(C), np.ones(C)
    rng = np.random.default_rng(run["seed"])
    n = _n(shape, axis)
    for k in range(1, run["batches"] + 1):
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        y = bn(x)
        factor = 1.0 / k if momentum is None else momentum
        with np.errstate(all="ignore"):
            ey, _, esi = ref.batch_norm_forward(x, None, None, rm, rv, True, factor, bn.eps,
                                                axis=axis)
        assert_close(y, ey, dtype, n, scale=forward_scale(x, axis, esi), err_msg="y")
    assert bn.num_batches_tracked == run["batches"]
    assert_close(bn.running_mean, rm, dtype, n * run["batches"], err_msg="running_mean")
    assert_close(bn.running_var, rv, dtype, n * run["batches"], err_msg="running_var")
