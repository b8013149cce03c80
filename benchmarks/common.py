"""Shared parameters, cached input data and the timing harness of the asv suite.

Sizes are chosen so that ``asv run --python=same --quick`` finishes in a minute or two on
two cores, while each array (~1M values) is well outside the L2 cache.

This module must keep working against older commits of cbn (asv runs the current suite
against every commit it benchmarks), so it uses only the public functional API and
``cbn._reference`` of the cbn it measures, never ``cbn._bench``. The timing harness,
``cbn/_timing.py`` (the one ``python -m cbn bench`` uses), is loaded from this checkout by
its path, so the method is the same whichever commit is measured; outside a checkout the
installed ``cbn._timing`` is used.

Thread counts are pinned, so that figures from different commits and machines mean the
same: every benchmark runs cbn on ``THREADS`` = 1 thread, except those of
``bench_threads``, whose thread count is a parameter (``CBN_ASV_MULTI_THREADS``, default
2) and so part of each result's name.
"""

import functools
import importlib.util
import os
import sys
import types
from pathlib import Path

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

#: Threads for cbn in every benchmark but bench_threads'. Fixed: a default thread count
#: would follow the machine (and a team waiting for a core that another process holds
#: turns the figures to noise). The NumPy reference takes the argument and ignores it.
THREADS = 1


def _multi_threads(text):
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 2 for n in counts):
        raise ValueError(f"CBN_ASV_MULTI_THREADS must be thread counts >= 2 separated by "
                         f"commas, got {text!r}")
    return counts


#: Thread counts of the bench_threads benchmarks (a parameter: part of the result's name).
MULTI_THREADS = _multi_threads(os.environ.get("CBN_ASV_MULTI_THREADS", "2"))


def _load_timing():
    """cbn/_timing.py of this checkout (the installed cbn._timing outside a checkout)."""
    path = Path(__file__).resolve().parent.parent / "cbn" / "_timing.py"
    if path.is_file():
        name = "_cbn_asv_timing"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]
    from cbn import _timing
    return _timing


timing = _load_timing()

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


def paired_ratio(fn, baseline):  # (not time_*: asv would take it for a benchmark)
    """Time of ``fn`` / time of ``baseline``, measured interleaved in this process: the
    median of the ratios of samples taken one after the other (:func:`cbn._timing.time_ratio`;
    a slow side is timed 3 times), to 4 significant digits. Lower is better, as for a
    time: asv flags an increase."""
    return float(f"{timing.time_ratio(fn, baseline, min_repeat=5, min_time=0.1):.4g}")

