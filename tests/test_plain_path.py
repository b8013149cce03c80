"""The plain-call fast path (cbn._kernels.plain_forward / plain_backward).

A call whose arrays are already what the kernels need skips the general Python path. The
two paths must give bit-identical results, and the fast path must decline (return None,
writing nothing) every call that is not plain, so that the general path validates it.
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn import _kernels
from cbn import functional as F
from cbn._threads import MIN_PARALLEL_SIZE

from conftest import DTYPES, make_input, make_params

CASES = [((6, 5), 1), ((4, 6, 3, 3), 1), ((4, 3, 3, 6), -1), ((3, 4, 5), 2)]
CASE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in CASES]


class _Sub(np.ndarray):
    """An ndarray subclass: never plain."""


def _forward(x, w, b, rm, rv, training, axis, **kw):
    rm, rv = rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5, axis=axis, **kw)
    return y, sm, si, rm, rv


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", CASES, ids=CASE_IDS)
def test_plain_and_general_paths_agree(shape, axis, dtype, training):
    x = make_input(shape, axis, dtype)
    C = shape[axis]
    w, b, rm, rv = make_params(C, dtype)
    assert _kernels.plain_forward(x, w, b, rm.copy(), rv.copy(), training, 0.1, 1e-5, axis,
                                  1, MIN_PARALLEL_SIZE) is not None
    plain = _forward(x, w, b, rm, rv, training, axis)
    general = {
        "list weight": _forward(x, list(w), b, rm, rv, training, axis),
        "numpy bool training": _forward(x, w, b, rm, rv, np.bool_(training), axis),
        "numpy int threads": _forward(x, w, b, rm, rv, training, axis,
                                      n_threads=np.int64(1)),
        "subclass input": _forward(x.view(_Sub), w, b, rm, rv, training, axis),
        "out=": _forward(x, w, b, rm, rv, training, axis, out=np.empty_like(x)),
    }
    for name, got in general.items():
        for a, e in zip(got, plain):
            np.testing.assert_array_equal(np.asarray(a), e, err_msg=name)

    g = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    _, sm, si, _, _ = plain
    pb = cbn.batch_norm_backward(g, x, w, sm, si, training, axis=axis)
    assert _kernels.plain_backward(g, x, w, sm, si, training, axis, 1,
                                   MIN_PARALLEL_SIZE) is not None
    for name, got in {
        "list weight": cbn.batch_norm_backward(g, x, list(w), sm, si, training, axis=axis),
        "subclass grad": cbn.batch_norm_backward(g.view(_Sub), x, w, sm, si, training,
                                                 axis=axis),
        "residual=False": cbn.batch_norm_backward(g, x, w, sm, si, training, axis=axis,
                                                  residual=False),
    }.items():
        for a, e in zip(got, pb):
            np.testing.assert_array_equal(np.asarray(a), e, err_msg=name)


def _declined_forward():
    """(name, args) of forward calls that are not plain; args as plain_forward takes them."""
    x = make_input((6, 4), 1, np.float32)
    w, b, rm, rv = make_params(4, np.float32)
    ro = rm.copy()
    ro.flags.writeable = False
    base = dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv, training=True,
                momentum=0.1, eps=1e-5, axis=1, n_threads=1)
    variants = {
        "list input": dict(x=x.tolist()),
        # (float16 input with float32 vectors is plain: torch's mixed mode; half vectors
        # are converted by the general path)
        "float16 input and weight": dict(x=x.astype(np.float16),
                                         weight=w.astype(np.float16)),
        "byte-swapped input": dict(x=x.astype(">f4")),
        "1D input": dict(x=x[0]),
        "empty input": dict(x=x[:0]),
        "strided input": dict(x=x[::2]),
        "axis out of range": dict(axis=2),
        "bool axis": dict(axis=True),
        "float64 weight": dict(weight=w.astype(np.float64)),
        "weight of 3 values": dict(weight=w[:3]),
        "2D running_mean": dict(running_mean=rm.reshape(4, 1)),
        "read-only running_mean": dict(running_mean=ro),
        "eval without running_var": dict(training=False, running_var=None),
        "int training": dict(training=1),
        "int eps": dict(eps=0),
        "NaN eps": dict(eps=float("nan")),
        "negative eps": dict(eps=-1.0),
        "int momentum": dict(momentum=1),
        "zero threads": dict(n_threads=0),
        "float threads": dict(n_threads=1.0),
        "bool threads": dict(n_threads=True),
        "one value per channel": dict(x=x[:1]),
    }
    for name, change in variants.items():
        yield name, {**base, **change}


@pytest.mark.parametrize("name, args", list(_declined_forward()),
                         ids=[n for n, _ in _declined_forward()])
def test_plain_forward_declines_and_writes_nothing(name, args):
    rm, rv = args["running_mean"], args["running_var"]
    before = [None if a is None else a.copy() for a in (rm, rv)]
    assert _kernels.plain_forward(*args.values(), MIN_PARALLEL_SIZE) is None
    for a, b in zip((rm, rv), before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_plain_backward_declines():
    x = make_input((6, 4), 1, np.float64)
    w, _, m, v = make_params(4, np.float64)
    g = np.ones_like(x)
    plain = (g, x, w, m, v, True, 1, 1)
    assert _kernels.plain_backward(*plain, MIN_PARALLEL_SIZE) is not None
    for i, bad in [(0, g.astype(np.float32)), (0, g[:3]), (0, g.T.copy().T),
                   (2, w.astype(np.float32)), (3, None), (4, None), (5, 1), (7, -1)]:
        args = list(plain)
        args[i] = bad
        assert _kernels.plain_backward(*args, MIN_PARALLEL_SIZE) is None, (i, bad)


def test_plain_path_follows_set_num_threads():
    # Large enough to run in parallel: the fast path asks cbn._threads (the one home of the
    # thread policy) for the count, set_num_threads reaches it, and the result does not
    # depend on the count. Small inputs do not ask: they run on one thread.
    from cbn import _threads
    x = make_input((64, 8, 128), 1, np.float32)
    assert x.size >= MIN_PARALLEL_SIZE
    w, b, rm, rv = make_params(8, np.float32)
    seen = []

    def spy(n_threads, a):
        n = _threads.call_threads(n_threads, a)
        seen.append(n)
        return n

    _kernels._set_thread_resolver(spy)
    try:
        cbn.set_num_threads(2)
        y2 = cbn.batch_norm(x, None, None, w, b, training=True)
        cbn.set_num_threads(1)
        y1 = cbn.batch_norm(x, None, None, w, b, training=True)
        cbn.batch_norm(x[:2, :, :2], None, None, w, b, training=True)      # small
    finally:
        _kernels._set_thread_resolver(_threads.call_threads)
        cbn.set_num_threads(None)
    assert seen == [2, 1]
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_plain_and_general_paths_agree(dtype, training):
    shape, axis = (4, 3, 3, 6), -1
    x = make_input(shape, axis, dtype)
    w, b, rm, rv = make_params(6, dtype)
    r = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    g = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    kw = dict(axis=axis, activation="relu")
    plain = _forward(x, w, b, rm, rv, training, residual=r, **kw)
    general = _forward(x, w, b, rm, rv, training, residual=r.view(_Sub), **kw)
    for a, e in zip(general, plain):
        np.testing.assert_array_equal(np.asarray(a), e)
    y, sm, si = plain[:3]
    assert _kernels.plain_backward(g, x, w, sm, si, training, axis, 1, MIN_PARALLEL_SIZE,
                                   y, True) is not None
    pb = cbn.batch_norm_backward(g, x, w, sm, si, training, output=y, residual=True, **kw)
    gb = cbn.batch_norm_backward(g, x, w, sm, si, training, output=y.view(_Sub),
                                 residual=True, **kw)
    assert len(pb) == len(gb) == 4
    for a, e in zip(gb, pb):
        np.testing.assert_array_equal(np.asarray(a), e)
    # residual=1 (truthy, not True) takes the general path and still returns four arrays
    assert len(cbn.batch_norm_backward(g, x, w, sm, si, training, output=y, residual=1,
                                       **kw)) == 4


def test_fused_plain_path_declines():
    x = make_input((6, 4), 1, np.float32)
    w, b, rm, rv = make_params(4, np.float32)
    args = (x, w, b, rm, rv, True, 0.1, 1e-5, 1, 1, MIN_PARALLEL_SIZE)
    assert _kernels.plain_forward(*args, x, True) is not None
    for bad in (x[:3], x.astype(np.float64), x.tolist(), np.asfortranarray(x.T).T[::1, ::2]):
        assert _kernels.plain_forward(*args, bad, True) is None
    bw = (x, x, w, rm, rv, True, 1, 1, MIN_PARALLEL_SIZE)
    for bad in (x[:3], x.astype(np.float64), x.tolist()):
        assert _kernels.plain_backward(*bw, bad, False) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_plain_and_general_paths_agree(dtype):
    shape, axis = (4, 6, 3, 3), 1
    x = make_input(shape, axis, dtype)
    m, s, t, _ = make_params(6, dtype)
    r = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    assert _kernels.plain_affine(x, m, s, t, axis, 1, MIN_PARALLEL_SIZE, r, True) is not None
    for kw in ({}, dict(activation="relu", residual=r)):
        plain = F.normalize(x, m, s, t, axis=axis, **kw)
        general = F.normalize(x, list(m), s, t, axis=axis, **kw)
        np.testing.assert_array_equal(general, plain)
        ref = (x.astype(np.float64) - m.reshape(6, 1, 1)) * s.reshape(6, 1, 1) + t.reshape(
            6, 1, 1)
        if kw:
            ref = np.maximum(ref + r, 0)
        np.testing.assert_allclose(plain, ref, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-5 if dtype == np.float32 else 1e-12)
    for bad in (dict(mean=None), dict(scale=s[:3]), dict(shift=t.astype(np.float16)),
                dict(x=x.tolist()), dict(residual=r[:2])):
        a = dict(x=x, mean=m, scale=s, shift=t, residual=None)
        a.update(bad)
        assert _kernels.plain_affine(a["x"], a["mean"], a["scale"], a["shift"], axis, 1,
                                     MIN_PARALLEL_SIZE, a["residual"], False) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_plain_and_general_paths_agree(dtype):
    shape, axis = (4, 3, 3, 6), -1
    x = make_input(shape, axis, dtype)
    w, b, rm, rv = make_params(6, dtype)
    for training in (True, False):
        e = _forward(x, w, b, rm, rv, training, axis)
        out = np.empty_like(x)
        got = _forward(x, w, b, rm, rv, training, axis, out=out)
        assert got[0] is out
        sub = np.empty_like(x).view(_Sub)                 # not plain: the general path
        gen = _forward(x, w, b, rm, rv, training, axis, out=sub)
        xi = x.copy()                                     # in place
        inp = _forward(xi, w, b, rm, rv, training, axis, out=xi)
        assert inp[0] is xi
        for a, b_, c, d in zip(got, gen, inp, e):
            np.testing.assert_array_equal(a, d)
            np.testing.assert_array_equal(np.asarray(b_), d)
            np.testing.assert_array_equal(c, d)


def test_out_overlapping_the_input_is_declined():
    x = make_input((8, 4), 1, np.float32)
    w, b, rm, rv = make_params(4, np.float32)
    base = np.concatenate([x, x])
    args = (w, b, rm, rv, False, 0.1, 1e-5, 1, 1, MIN_PARALLEL_SIZE, None, False)
    assert _kernels.plain_forward(base[:8], *args, base[1:9]) is None     # overlaps
    ro = np.empty_like(x)
    ro.flags.writeable = False
    assert _kernels.plain_forward(x, *args, ro) is None
    assert _kernels.plain_forward(x, *args, np.empty((4, 8), np.float32)) is None
    assert _kernels.plain_forward(x, *args, np.empty_like(x, dtype=np.float64)) is None
    # the general path gets the overlapping case right: as if computed out of place
    expected = cbn.batch_norm(base[:8].copy(), rm, rv, w, b)
    y = cbn.batch_norm(base[:8], rm, rv, w, b, out=base[1:9])
    assert y.base is base
    np.testing.assert_array_equal(y, expected)
