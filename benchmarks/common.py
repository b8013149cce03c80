"""Shared parameters and cached input data for the asv suite.

Sizes are chosen so that ``asv run --python=same --quick`` finishes in about a minute on
two cores, while each array (~1M values) is well outside the L2 cache.

This module must keep working against older commits of cbn (asv runs the current suite
against every commit it benchmarks), so it uses only the public functional API and
``cbn._reference``, never ``cbn._bench``.
"""

import functools
import os
import statistics
import time
import types

import numpy as np

import cbn
from cbn import _reference

#: 2D (N, C), 3D (N, C, L), 4D (N, C, H, W), 5D (N, C, D, H, W), all in channels-first order.
SHAPES = ["8192x128", "32x64x512", "32x64x28x28", "8x32x8x16x16"]
DTYPES = ["float32", "float64"]
#: channels_first: axis=1 on the array as given; channels_last: the same logical shape
#: stored as (N, *spatial, C), axis=-1. For 2D inputs both are the same, so 2D
#: channels_last is skipped.
LAYOUTS = ["channels_first", "channels_last"]
IMPLEMENTATIONS = ["cbn", "numpy"]

EPS = 1e-5
MOMENTUM = 0.1

#: Threads for cbn in the time_*/peakmem_* benchmarks: CBN_ASV_THREADS=n, else cbn's default
#: (OMP_NUM_THREADS, or all cores). On a shared machine use CBN_ASV_THREADS=1: a team of
#: threads waits for a core that another process holds, and the figures turn to noise.
#: (The NumPy reference takes the argument and ignores it.) track_speedup_* always compare
#: one cbn thread with single-threaded NumPy.
THREADS = int(os.environ.get("CBN_ASV_THREADS", "0")) or None

FORWARD = {"cbn": cbn.batch_norm_forward, "numpy": _reference.batch_norm_forward}
BACKWARD = {"cbn": cbn.batch_norm_backward, "numpy": _reference.batch_norm_backward}


def parse_shape(text):
    return tuple(int(v) for v in text.split("x"))


def array_shape(shape, layout):
    """(shape of the stored array, channel axis)."""
    if layout == "channels_last":
        return (shape[0],) + tuple(shape[2:]) + (shape[1],), -1
    return tuple(shape), 1


def check_params(shape, layout):
    """Raise NotImplementedError (asv: skipped) for combinations that mean nothing new."""
    if layout == "channels_last" and len(parse_shape(shape)) == 2:
        raise NotImplementedError("2D input: channels_last is the same as channels_first")


@functools.lru_cache(maxsize=4)
def case(shape, dtype, layout, seed=0):
    """Input data for one parameter combination (cached per process: never write to it;
    the arrays stay writable because early commits of cbn rejected read-only inputs).

    Returns a namespace with x (input), g (an upstream gradient), w, b (affine parameters),
    rm, rv (initial running statistics: copy them before a training call), save_mean,
    save_invstd (x's mean and 1/std), axis, C. x and g are made in place, without
    temporaries.
    """
    check_params(shape, layout)
    dims = parse_shape(shape)
    ashape, axis = array_shape(dims, layout)
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    C = dims[1]
    x = rng.standard_normal(ashape, dtype=dtype)
    x *= 2
    x += 0.5
    g = rng.standard_normal(ashape, dtype=dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = (0.1 * rng.standard_normal(C)).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    # The batch statistics of x are those of its distribution to a few digits: taking
    # them from the distribution keeps setup free of temporaries, which would otherwise
    # show in the peakmem_* benchmarks (the process's peak memory includes setup).
    save_mean = np.full(C, 0.5, dtype=dtype)
    save_invstd = np.full(C, 0.5, dtype=dtype)
    return types.SimpleNamespace(x=x, g=g, w=w, b=b, rm=rm, rv=rv, save_mean=save_mean,
                                 save_invstd=save_invstd, axis=axis, C=C, shape=dims)


def running_stats(d):
    """Fresh writable running statistics for a training call."""
    return d.rm.copy(), d.rv.copy()


def median_time(fn, *, min_repeat=5, min_time=0.05, max_repeat=200):
    """Median seconds of one call of ``fn`` (after one warm-up call)."""
    fn()
    samples = []
    while len(samples) < max_repeat and (len(samples) < min_repeat
                                         or sum(samples) < min_time):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def speedup(numpy_fn, cbn_fn):
    """NumPy time / cbn time, medians measured alternately (the reference 3 times).
    Callers run cbn on one thread: a per-core comparison with single-threaded NumPy."""
    numpy_fn()
    cbn_fn()
    t_numpy, t_cbn = [], []
    for i in range(3):
        t0 = time.perf_counter()
        numpy_fn()
        t_numpy.append(time.perf_counter() - t0)
        t_cbn.append(median_time(cbn_fn, min_repeat=3, min_time=0.01))
    return round(statistics.median(t_numpy) / statistics.median(t_cbn), 2)
