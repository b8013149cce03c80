"""Threads: bit-identical results for any thread count, thread-count control, GIL release.

Time is never asserted here (machines are shared and noisy). The GIL test counts what a
Python loop in the main thread manages to do while a worker thread is inside one kernel
call, relative to what it manages while the worker sleeps for the same time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import cbn

from conftest import DTYPES, make_input, make_params

THREAD_COUNTS = (1, 2, 3, 4)

# >= 2**16 values, so that every call runs parallel (inputs under 2**15 run on one thread)
PARALLEL_CASES = [
    ((4, 8, 64, 64), 1),        # NCHW: planes kernel
    ((4, 64, 64, 8), -1),       # NHWC: rows kernel
    ((3, 5, 101, 67), 1),       # odd sizes: tiles do not divide evenly
    ((3, 101, 67, 5), -1),
    ((16411, 5), 1),            # 2D, odd number of rows
    ((2, 3, 9, 41, 61), 1),     # 5D
    ((16, 97, 7, 7), 1),        # short planes, many per call; the threads' shares start
                                # inside a batch entry (97 channels, an odd number)
]
PARALLEL_IDS = ["nchw", "nhwc", "nchw_odd", "nhwc_odd", "2d_odd", "5d", "short_planes"]


def _all_outputs(x, dy, axis, n_threads):
    """Every output of every entry point, for one thread count."""
    C = x.shape[axis]
    w, b, rm, rv = make_params(C, x.dtype)
    res = {}
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis=axis,
                                       n_threads=n_threads)
    res.update(y=y, save_mean=sm, save_invstd=si, running_mean=rm, running_var=rv)
    res["y_eval"] = cbn.batch_norm(x, rm, rv, w, b, False, axis=axis, n_threads=n_threads)
    res["y_plain"] = cbn.batch_norm(x, None, None, training=True, axis=axis,
                                    n_threads=n_threads)
    for name, r in zip(("gx", "gw", "gb"),
                       cbn.batch_norm_backward(dy, x, w, sm, si, True, axis=axis,
                                               n_threads=n_threads)):
        res[name] = r
    for name, r in zip(("gx_eval", "gw_eval", "gb_eval"),
                       cbn.batch_norm_backward(dy, x, w, rm, 1 / np.sqrt(rv + 1e-5), False,
                                               axis=axis, n_threads=n_threads)):
        res[name] = r
    return res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", PARALLEL_CASES, ids=PARALLEL_IDS)
def test_bit_identical_for_any_thread_count(shape, axis, dtype):
    assert np.prod(shape) >= 2 ** 16
    x = make_input(shape, axis, dtype)
    dy = make_input(shape, axis, dtype, seed=2)
    first = _all_outputs(x, dy, axis, THREAD_COUNTS[0])
    for nt in THREAD_COUNTS[1:]:
        res = _all_outputs(x, dy, axis, nt)
        for name, a in first.items():
            assert np.array_equal(res[name], a), f"{name} differs with n_threads={nt}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_set_num_threads_gives_same_bits(dtype):
    shape, axis = (4, 8, 64, 64), 1
    x = make_input(shape, axis, dtype)
    dy = make_input(shape, axis, dtype, seed=2)
    first = _all_outputs(x, dy, axis, 1)
    for nt in (2, 3):
        cbn.set_num_threads(nt)
        res = _all_outputs(x, dy, axis, None)
        for name, a in first.items():
            assert np.array_equal(res[name], a), f"{name} differs with set_num_threads({nt})"


def test_set_get_num_threads_round_trip():
    default = cbn.get_num_threads()
    assert isinstance(default, int) and default >= 1
    try:
        for n in (1, 3, 7):
            cbn.set_num_threads(n)
            assert cbn.get_num_threads() == n
        cbn.set_num_threads(np.int64(2))          # any integer type
        assert cbn.get_num_threads() == 2
        cbn.set_num_threads(None)
        assert cbn.get_num_threads() == default
    finally:
        cbn.set_num_threads(None)


def test_n_threads_argument_overrides_setting():
    # an explicit n_threads is accepted whatever the global setting, and gives the same bits
    x = make_input((4, 8, 64, 64), 1, np.float32)
    cbn.set_num_threads(1)
    a = cbn.batch_norm(x, None, None, training=True, n_threads=4)
    cbn.set_num_threads(4)
    b = cbn.batch_norm(x, None, None, training=True, n_threads=1)
    assert np.array_equal(a, b)
    assert cbn.get_num_threads() == 4


def test_threadpoolctl_limits_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    cbn.set_num_threads(None)
    before = cbn.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert cbn.get_num_threads() == 1
    assert cbn.get_num_threads() == before
    if before == 1:
        with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
            assert cbn.get_num_threads() == 2


def test_omp_num_threads_environment():
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    # a fresh interpreter, importing the same cbn as this process
    root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="3")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cbn; "
            "print(cbn.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code, root], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "3"


def test_openmp_enabled_is_bool():
    assert isinstance(cbn.openmp_enabled(), bool)
    if not cbn.openmp_enabled():
        assert cbn.get_num_threads() == 1


# ----------------------------------------------------------------------------- the GIL


def _count_during(call):
    """Run ``call`` in a worker thread while this thread counts in a Python loop.

    Returns (count made while the worker was inside ``call``, seconds it took). The
    worker reads the counter just before and just after ``call``.
    """
    box = [0]
    state = {}
    go = threading.Event()

    def worker():
        go.wait()
        state["before"] = box[0]
        t0 = time.perf_counter()
        call()
        state["seconds"] = time.perf_counter() - t0
        state["after"] = box[0]
        state["done"] = True

    th = threading.Thread(target=worker)
    th.start()
    go.set()
    while "done" not in state:
        box[0] += 1
    th.join()
    return state["after"] - state["before"], state["seconds"]


def _pattern_array(shape):
    """A float32 array of ``shape`` filled cheaply with a non-constant pattern."""
    x = np.empty(shape, np.float32)
    pattern = (np.arange(4096) % 17).astype(np.float32)
    x.reshape(-1, 4096)[:] = pattern
    return x


@pytest.fixture(scope="module")
def long_kernel_inputs():
    """Inputs (NCHW and NHWC) large enough for one single-threaded training forward call
    to last about 0.05 s or more (up to 2**25 values), i.e. 100 GIL switch intervals of
    the 0.5 ms set by the test."""
    out = {}
    for name, axis in (("nchw", 1), ("nhwc", -1)):
        def shape_for(size):
            n = size // (8 * 256)
            return (n, 8, 16, 16) if axis == 1 else (n, 16, 16, 8)
        probe = _pattern_array(shape_for(1 << 22))
        for _ in range(2):      # the second call is free of first-touch page faults
            t0 = time.perf_counter()
            cbn.batch_norm_forward(probe, None, None, None, None, True, 0.1, 1e-5,
                                   axis=axis, n_threads=1)
            seconds = time.perf_counter() - t0
        size = 1 << 22
        while size < 1 << 25 and seconds * size / (1 << 22) < 0.05:
            size *= 2
        out[name] = (_pattern_array(shape_for(size)), axis)
    return out


@pytest.mark.parametrize("kernel", ["forward_train", "forward_eval", "backward_train"])
@pytest.mark.parametrize("lay", ["nchw", "nhwc"])
def test_gil_released_during_kernels(long_kernel_inputs, lay, kernel):
    x, axis = long_kernel_inputs[lay]
    C = x.shape[axis]
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
    if kernel == "forward_train":
        def call():
            cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, axis=axis,
                                   n_threads=1)
    elif kernel == "forward_eval":
        out = np.empty_like(x)

        def call():
            cbn.batch_norm(x, zeros, ones, None, None, False, axis=axis, out=out,
                           n_threads=1)
    else:
        def call():
            cbn.batch_norm_backward(x, x, None, zeros, ones, True, axis=axis, n_threads=1)
    call()                      # warm up (page faults, first-touch allocation)

    # If the kernel held the GIL, the main thread could count only in the few
    # microseconds of Python around the kernel, plus about one switch interval (set to
    # 0.5 ms below) at each end: a few percent of a call of >= 20 ms (measured with
    # list.sort, which holds the GIL: 0.02 to 0.05). Released, the main thread counts all
    # along (measured here: 0.35 to 0.5 of its rate while the worker sleeps, the kernel
    # competing for cores and memory). The reference is a worker that sleeps (releasing
    # the GIL) for the same time; the best of up to three tries counts.
    ratios = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    try:
        for _ in range(3):
            during_kernel, seconds = _count_during(call)
            during_sleep, _ = _count_during(lambda: time.sleep(seconds))
            ratios.append(during_kernel / max(during_sleep, 1))
            if ratios[-1] > 0.15:
                break
    finally:
        sys.setswitchinterval(interval)
    assert max(ratios) > 0.15, (
        f"the main thread barely ran while the worker was in the {kernel} kernel: "
        f"counts relative to a sleep of the same length {ratios}")
