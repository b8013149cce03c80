"""cbn's time as a fraction of another's, measured inside one benchmark (``track_*``).

A ratio of two times taken in the same process, interleaved (the median of the ratios of
samples taken one after the other), is far steadier on a shared machine than two separate
asv timings: these are the figures to watch across commits.
Each is cbn's median time over the other's, so lower is better, as for a time, and asv's
"increase = regression" reads them the right way round (the ``track_speedup_*`` that
these replace were NumPy time / cbn time, and asv listed their improvements as
regressions).

``CbnOverNumpy``: over the NumPy reference (single-threaded, float64 inside).
``CbnOverCopy``: over ``np.copyto`` of the input into a preallocated array, the memory
bandwidth floor; the figure is cbn's cost in copies of its input (ideal: eval about 1,
training forward 1.5, backward 2.5). The forward writes into a preallocated ``out=``, so
neither side allocates and the figure is the kernels' alone (the backward, which has no
``out=`` in every commit, allocates its grad_input). Noise from other tenants' memory
traffic hits both sides alike, so this is the steadiest figure of the suite.

cbn runs on one thread (``common.THREADS``). The copy ratios have half-precision rows
(float16; bfloat16 where ml_dtypes is installed): the copy is then of the half array, so
the figure is the half loops' cost in copies of their own input (issue 19's targets: eval
1.2, training forward 1.8, backward 3.0 on inputs of 10 MB or more).
"""

import numpy as np

from . import common
from .common import DTYPES, EPS, LAYOUTS, MOMENTUM, SHAPES, THREADS


def _forward(d, impl, training, out=None):
    fwd = common.FORWARD[impl]
    rm, rv = common.running_stats(d)
    if out is not None:
        return lambda: fwd(d.x, d.w, d.b, rm, rv, training, MOMENTUM, EPS, axis=d.axis,
                           n_threads=THREADS, out=out)
    return lambda: fwd(d.x, d.w, d.b, rm, rv, training, MOMENTUM, EPS, axis=d.axis,
                       n_threads=THREADS)


def _backward(d, impl, out=None):
    bwd = common.BACKWARD[impl]
    if out is not None:
        return lambda: bwd(d.g, d.x, d.w, d.save_mean, d.save_invstd, True, axis=d.axis,
                           n_threads=THREADS, out=out)
    return lambda: bwd(d.g, d.x, d.w, d.save_mean, d.save_invstd, True, axis=d.axis,
                       n_threads=THREADS)


class CbnOverNumpy:
    params = [SHAPES, DTYPES, LAYOUTS]
    param_names = ["shape", "dtype", "layout"]
    unit = "cbn time / numpy time"
    timeout = 180

    def setup(self, shape, dtype, layout):
        self.d = common.case(shape, dtype, layout)

    def track_cbn_over_numpy_training_forward(self, shape, dtype, layout):
        return common.paired_ratio(_forward(self.d, "cbn", True),
                                   _forward(self.d, "numpy", True))

    def track_cbn_over_numpy_eval_forward(self, shape, dtype, layout):
        return common.paired_ratio(_forward(self.d, "cbn", False),
                                   _forward(self.d, "numpy", False))

    def track_cbn_over_numpy_backward(self, shape, dtype, layout):
        return common.paired_ratio(_backward(self.d, "cbn"),
                                   _backward(self.d, "numpy"))


#: the copy ratios' dtypes: the float ones and the half ones (bfloat16 needs ml_dtypes)
COPY_DTYPES = DTYPES + ["float16", "bfloat16"]


def _dtype(name):
    """The dtype of a parameter value; NotImplementedError (asv: skipped) for bfloat16
    without ml_dtypes."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise NotImplementedError("bfloat16 needs ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _CopyBaseline:
    """setup for the ratios over a copy: the case, a preallocated output, and the copy
    (``np.copyto`` of the input into an array of its size). No benchmarks of its own."""
    param_names = ["shape", "dtype", "layout"]
    unit = "copies"

    def setup(self, shape, dtype, layout):
        self.d = common.case(shape, _dtype(dtype), layout)
        buf = np.empty_like(self.d.x)
        self.out = np.empty_like(self.d.x)
        self.copy = lambda: np.copyto(buf, self.d.x)


class CbnOverCopy(_CopyBaseline):
    params = [SHAPES, COPY_DTYPES, LAYOUTS]
    timeout = 120

    def track_cbn_over_copy_training_forward(self, shape, dtype, layout):
        return common.paired_ratio(_forward(self.d, "cbn", True, self.out), self.copy)

    def track_cbn_over_copy_eval_forward(self, shape, dtype, layout):
        return common.paired_ratio(_forward(self.d, "cbn", False, self.out), self.copy)

    def track_cbn_over_copy_backward(self, shape, dtype, layout):
        return common.paired_ratio(_backward(self.d, "cbn"), self.copy)


#: inputs of 20 MB and more, where the training passes meet the memory floor (channel-blocked
#: planes, streaming stores): docs/performance.md, "Training at the memory floor"
FLOOR_SHAPES = ["32x64x56x56", "64x128x28x28", "32x3x224x224", "16x32x16x32x32"]


class MemoryFloor(_CopyBaseline):
    """cbn's training forward, eval forward and backward on large inputs, all writing into
    out=, in copies of the same array (lower is better; the issue's targets: channels-first
    training 1.10 and backward 1.6, channels-last training 1.6, backward 2.7 and eval 1.15;
    see docs/performance.md)."""
    params = [FLOOR_SHAPES, ["float32", "float64", "float16", "bfloat16"], LAYOUTS]
    timeout = 300

    def track_floor_training_forward(self, shape, dtype, layout):
        return common.paired_ratio(_forward(self.d, "cbn", True, self.out), self.copy)

    def track_floor_eval_forward(self, shape, dtype, layout):
        return common.paired_ratio(_forward(self.d, "cbn", False, self.out), self.copy)

    def track_floor_backward(self, shape, dtype, layout):
        return common.paired_ratio(_backward(self.d, "cbn", self.out), self.copy)
