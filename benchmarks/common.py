"""Shared parameters, cached input data and the timing harness of the asv suite.

Sizes are chosen so that ``asv run --python=same --quick`` finishes in a minute or two on
two cores, while each array (~1M values) is well outside the L2 cache.

This module must keep working against older commits of cbn (asv runs the current suite
against every commit it benchmarks), so it uses only the public functional API and
``cbn._reference`` of the cbn it measures, never ``cbn._bench``. The timing harness,
``cbn/_timing.py``, and the data recipe and layout names, ``cbn/_benchdata.py`` (the ones
``python -m cbn bench`` uses), are loaded from this checkout by their paths, so the method
and the data are the same whichever commit is measured; outside a checkout the installed
``cbn._timing`` and ``cbn._benchdata`` are used.

Thread counts are pinned, so that figures from different commits and machines mean the
same: every benchmark runs cbn on ``THREADS`` = 1 thread, except those of
``bench_threads``, whose thread count is a parameter (``CBN_ASV_MULTI_THREADS``, default
2) and so part of each result's name.
"""

import functools
import importlib.util
import os
import sys
from pathlib import Path

import cbn
from cbn import _reference


def _load_checkout_module(name):
    """cbn/NAME.py of this checkout (the installed cbn.NAME outside a checkout)."""
    path = Path(__file__).resolve().parent.parent / "cbn" / f"{name}.py"
    if path.is_file():
        key = f"_cbn_asv{name}"  # _cbn_asv_timing, _cbn_asv_benchdata
        if key not in sys.modules:
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module
            spec.loader.exec_module(module)
        return sys.modules[key]
    return importlib.import_module(f"cbn.{name}")


timing = _load_checkout_module("_timing")
benchdata = _load_checkout_module("_benchdata")


#: 2D (N, C), 3D (N, C, L), 4D (N, C, H, W), 5D (N, C, D, H, W), all in channels-first order.
SHAPES = ["8192x128", "32x64x512", "32x64x28x28", "8x32x8x16x16"]
DTYPES = ["float32", "float64"]
#: channels_first: axis=1 on the array as given; channels_last: the same logical shape
#: stored as (N, *spatial, C), axis=-1 (cbn/_benchdata.py). For 2D inputs both are the same,
#: so 2D channels_last is skipped.
LAYOUTS = list(benchdata.LAYOUTS)
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


FORWARD = {"cbn": cbn.batch_norm_forward, "numpy": _reference.batch_norm_forward}
BACKWARD = {"cbn": cbn.batch_norm_backward, "numpy": _reference.batch_norm_backward}


def parse_shape(text):
    return benchdata.parse_shape(text)


def array_shape(shape, layout):
    """(shape of the stored array, channel axis)."""
    return benchdata.array_shape(shape, layout)


def check_params(shape, layout):
    """Raise NotImplementedError (asv: skipped) for combinations that mean nothing new."""
    if not benchdata.layout_applies(parse_shape(shape), layout):
        raise NotImplementedError("2D input: channels_last is the same as channels_first")


@functools.lru_cache(maxsize=4)
def case(shape, dtype, layout, seed=0):
    """Input data for one parameter combination (cached per process: never write to it;
    the arrays stay writable because early commits of cbn rejected read-only inputs).

    The recipe is :func:`cbn._benchbenchdata.make_case`: a namespace with x (input), g (an
    upstream gradient), w, b (affine parameters), rm, rv (initial running statistics: copy
    them before a training call), save_mean, save_invstd (x's distribution's mean and
    1/std, so that setup makes no temporaries, which would show in the peakmem_*
    benchmarks), axis, C, shape.
    """
    check_params(shape, layout)
    return benchdata.make_case(parse_shape(shape), dtype, layout, seed)


def running_stats(d):
    """Fresh writable running statistics for a training call."""
    return d.rm.copy(), d.rv.copy()


def paired_ratio(fn, baseline):  # (not time_*: asv would take it for a benchmark)
    """Time of ``fn`` / time of ``baseline``, measured interleaved in this process: the
    median of the ratios of samples taken one after the other (:func:`cbn._timing.time_ratio`;
    a slow side is timed 3 times), to 4 significant digits. Lower is better, as for a
    time: asv flags an increase."""
    return float(f"{timing.time_ratio(fn, baseline, min_repeat=5, min_time=0.1):.4g}")

