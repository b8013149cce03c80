"""Half-precision inputs run in the kernels' own float16/bfloat16 loops (issue 19).

The loops read float16 or bfloat16 storage, convert in registers, compute exactly as the
float32 loops do and round each output once. Two independent oracles:

* the conversion path, which cbn still takes when an array that accompanies a half input
  (residual, grad_output, output) is float32: NumPy converts the whole input to float32,
  the float32 loops run and NumPy rounds the output. Same values, bit for bit, for every
  loop shape, operation, activation, layout, thread count and blocking mode;
* memory: a half call allocates its output and nothing of the input's size besides
  (no float32 copy of the input or of the output), measured with tracemalloc, which
  sees NumPy's data allocations.

The saved corpus (test_corpus.py) and the CPU targets (test_cpu_targets.py) pin the same
results against the tree before the native loops existed.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import cbn
from cbn import _kernels
from cbn import _stages


def _half(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


HALVES = ["float16", "bfloat16"]

# (shape, axis): planes (long and short), rows (channels-last, small K, 2D)
LAYOUTS = [
    ((4, 6, 37, 11), 1),        # planes, K = 407 (ragged vector tail)
    ((8, 5, 16), 1),            # planes, K = 16 (the smallest planes)
    ((6, 7, 3, 5), -1),         # channels-last, C = 5
    ((64, 24), 1),              # 2D: rows
    ((3, 4, 5, 6, 7), 1),       # 5D
    ((50, 3, 2), 1),            # rows, K = 2
    ((2, 64, 70, 33), 1),       # large enough for 2 threads
]
ACTS = [None, "relu", "relu6", "leaky_relu", "silu", "hardswish"]
FROM_OUTPUT = {"relu", "relu6", "leaky_relu"}


def _data(shape, axis, dt, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dt)
    r = rng.standard_normal(shape).astype(dt)
    g = rng.standard_normal(shape).astype(dt)
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return x, r, g, w, b


def _same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    fa = np.asarray(a, np.float32)
    fb = np.asarray(b, np.float32)
    nan = np.isnan(fa)
    assert np.array_equal(nan, np.isnan(fb)), what
    assert np.array_equal(np.where(nan, 0, a.view(np.uint16)),
                          np.where(nan, 0, b.view(np.uint16))), what


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("nt", [1, 2])
def test_native_forward_and_backward_equal_the_conversion_path(name, shape, axis, act, nt):
    dt = _half(name)
    x, r, g, w, b = _data(shape, axis, dt)
    r32 = r.astype(np.float32)          # exact: the float32 residual forces conversion
    C = shape[axis]
    for training in (True, False):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        rm2, rv2 = rm.copy(), rv.copy()
        kw = dict(axis=axis, n_threads=nt, activation=act)
        y, m, s = cbn.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5, residual=r,
                                         **kw)
        y2, m2, s2 = cbn.batch_norm_forward(x, w, b, rm2, rv2, training, 0.1, 1e-5,
                                            residual=r32, **kw)
        _same(y, y2, f"forward y, training={training}")
        assert np.array_equal(m, m2) and np.array_equal(s, s2)
        assert np.array_equal(rm, rm2) and np.array_equal(rv, rv2)
        out = y if act in FROM_OUTPUT else None
        res = r if act in ("silu", "hardswish") else True
        bkw = dict(axis=axis, n_threads=nt, activation=act, output=out, bias=b,
                   residual=res)
        got = cbn.batch_norm_backward(g, x, w, m, s, training, **bkw)
        want = cbn.batch_norm_backward(g.astype(np.float32), x, w, m, s, training,
                                       **dict(bkw, output=None if out is None
                                              else out.astype(np.float32),
                                              residual=res if res is True
                                              else r32))
        _same(got[0], want[0], f"grad_input, training={training}")
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
        _same(got[3], want[3], f"grad_residual, training={training}")


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("mode", ["off", "force"])
@pytest.mark.parametrize("shape,axis", [((4, 12, 40, 41), 1), ((3, 5, 4196), 1),
                                        ((2, 4, 3001), 1), ((4, 9, 9, 64), -1),
                                        ((4, 9, 9, 48), -1)])
def test_blocked_and_two_pass_half_agree_with_the_conversion_path(name, mode, shape, axis):
    """Forced: channel-blocked planes, and non-temporal stores everywhere (rows too,
    whose line of half values holds 32 of them). Planes longer than 2048 values run the
    chained forward (each group's output written in the loop that reduces the next);
    3001 values start each plane's lines elsewhere."""
    dt = _half(name)
    x, r, g, w, b = _data(shape, axis, dt, seed=3)
    old = _kernels._blocking(mode, 4096 * 4)
    try:
        for nt in (1, 2):
            y, m, s = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5,
                                             n_threads=nt, axis=axis)
            y2, m2, s2 = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5,
                                                n_threads=nt, axis=axis,
                                                residual=np.zeros(x.shape, np.float32))
            _same(y, y2, f"forward, {mode}, {nt} threads")
            gx = cbn.batch_norm_backward(g, x, w, m, s, n_threads=nt, axis=axis)[0]
            gx2 = cbn.batch_norm_backward(g.astype(np.float32), x, w, m, s,
                                          n_threads=nt, axis=axis)[0]
            _same(gx, gx2, f"backward, {mode}, {nt} threads")
    finally:
        _kernels._blocking(*old)


@pytest.mark.parametrize("name", HALVES)
def test_out_and_in_place_half(name):
    dt = _half(name)
    x, r, g, w, b = _data((4, 6, 37, 11), 1, dt)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    want = cbn.batch_norm(x, rm, rv, w, b)
    out = np.empty_like(x)
    assert cbn.batch_norm(x, rm, rv, w, b, out=out) is out
    _same(out, want, "out=")
    xc = x.copy()
    cbn.batch_norm(xc, rm, rv, w, b, out=xc)
    _same(xc, want, "in place")


@pytest.mark.parametrize("name", HALVES)
def test_half_parameters_and_mixed_mode_agree(name):
    dt = _half(name)
    x, r, g, w, b = _data((4, 6, 9, 9), 1, dt)
    wh, bh = w.astype(dt), b.astype(dt)
    rmh, rvh = np.zeros(6, dt), np.ones(6, dt)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    y = cbn.batch_norm(x, rmh, rvh, wh, bh, training=True)
    y2 = cbn.batch_norm(x, rm, rv, wh.astype(np.float32), bh.astype(np.float32),
                        training=True)
    _same(y, y2, "half parameters")
    assert rmh.dtype == dt and np.array_equal(rmh, rm.astype(dt))
    assert np.array_equal(rvh, rv.astype(dt))


@pytest.mark.parametrize("name", HALVES)
def test_stages_read_half_storage(name):
    dt = _half(name)
    x, r, g, w, b = _data((5, 6, 33), 1, dt)
    mom = _stages.moments(x)
    mom32 = _stages.moments(x.astype(np.float32))
    assert mom.count == mom32.count
    assert np.array_equal(mom.mean, mom32.mean) and np.array_equal(mom.m2, mom32.m2)
    y, m, s = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    sums = _stages.backward_reduce(g, x, m)
    sums32 = _stages.backward_reduce(g.astype(np.float32), x, m)
    assert all(np.array_equal(a, c) for a, c in zip(sums, sums32))
    dx = _stages.backward_elements(g, x, w, m, s, *sums, mom.count)
    dx32 = _stages.backward_elements(g.astype(np.float32), x, w, m, s, *sums, mom.count)
    _same(dx, dx32, "backward_elements")


def _peak(f):
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape,axis", [((8, 16, 32, 32), 1), ((8, 32, 32, 16), -1)])
def test_half_calls_allocate_no_float32_copy(name, shape, axis):
    dt = _half(name)
    x, r, g, w, b = _data(shape, axis, dt)
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, m, s = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis=axis)
    out = np.empty_like(x)
    n = x.nbytes
    calls = {
        "eval": lambda: cbn.batch_norm(x, rm, rv, w, b, axis=axis),
        "train": lambda: cbn.batch_norm(x, rm, rv, w, b, training=True, axis=axis),
        "eval out=": lambda: cbn.batch_norm(x, rm, rv, w, b, axis=axis, out=out),
        "backward": lambda: cbn.batch_norm_backward(g, x, w, m, s, axis=axis),
        "backward out=": lambda: cbn.batch_norm_backward(g, x, w, m, s, axis=axis,
                                                         out=out),
        "normalize": lambda: cbn.functional.normalize(x, m, s, b, axis=axis),
    }
    for what, f in calls.items():
        f()
        fresh = "out=" not in what
        peak = _peak(f)
        # the output (if fresh) and per-channel scratch; a float32 copy of the input
        # alone would be 2n
        assert peak < (1.25 if fresh else 0.25) * n, (what, peak, n)


@pytest.mark.parametrize("name", HALVES)
def test_mixed_mode_is_a_plain_call(name):
    """Half input, float32 vectors (torch's mixed mode): the plain fast path takes it, with
    the general path's results."""
    from cbn._threads import MIN_PARALLEL_SIZE
    dt = _half(name)
    x, r, g, w, b = _data((8, 6, 5, 5), 1, dt)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    got = _kernels.plain_forward(x, w, b, rm.copy(), rv.copy(), True, 0.1, 1e-5, 1, 1,
                                 MIN_PARALLEL_SIZE)
    assert got is not None
    want = cbn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), True, 0.1, 1e-5,
                                  residual=np.zeros(x.shape, np.float32))
    _same(got[0], want[0], "plain forward")
    assert got[1].dtype == np.float32 and np.array_equal(got[1], want[1])
    assert np.array_equal(got[2], want[2])
    bwd = _kernels.plain_backward(g, x, w, got[1], got[2], True, 1, 1, MIN_PARALLEL_SIZE)
    assert bwd is not None
    want = cbn.batch_norm_backward(g.astype(np.float32), x, w, got[1], got[2])
    _same(bwd[0], want[0], "plain backward")
    assert bwd[1].dtype == np.float32 and np.array_equal(bwd[1], want[1])
