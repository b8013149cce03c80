"""Memory: cbn allocates nothing beyond its output.

``peakmem_*`` report the peak resident memory of the benchmark process, setup included
(the cached input, and the upstream gradient for backward). Implementation ``copy`` is
``x.copy()``: exactly one output-sized allocation, so ``cbn`` matching ``copy`` means cbn
needs no memory beyond its output, while the NumPy reference (float64 temporaries) needs
several times the input.

``track_extra_memory_*`` measure the same with tracemalloc, which NumPy reports its array
allocations to: the peak of traced memory during one call, minus what the call returns,
in units of the input's size (cbn: about 0; its per-channel buffers are tiny).
"""

import tracemalloc

from . import common
from .common import DTYPES, EPS, LAYOUTS, MOMENTUM, SHAPES, THREADS


def _call(d, op, implementation, rm, rv):
    if implementation == "copy":
        return (d.x.copy(),)
    if op == "backward":
        return common.BACKWARD[implementation](d.g, d.x, d.w, d.save_mean, d.save_invstd,
                                               True, axis=d.axis, n_threads=THREADS)
    training = op == "training"
    return common.FORWARD[implementation](d.x, d.w, d.b, rm, rv, training, MOMENTUM, EPS,
                                          axis=d.axis, n_threads=THREADS)


class PeakMemory:
    params = [SHAPES, DTYPES, LAYOUTS, ["copy", "cbn", "numpy"]]
    param_names = ["shape", "dtype", "layout", "implementation"]

    def setup(self, shape, dtype, layout, implementation):
        self.d = common.case(shape, dtype, layout)
        self.rm, self.rv = common.running_stats(self.d)

    def peakmem_training_forward(self, shape, dtype, layout, implementation):
        _call(self.d, "training", implementation, self.rm, self.rv)

    def peakmem_eval_forward(self, shape, dtype, layout, implementation):
        _call(self.d, "eval", implementation, self.rm, self.rv)

    def peakmem_backward(self, shape, dtype, layout, implementation):
        _call(self.d, "backward", implementation, self.rm, self.rv)


class ExtraMemory:
    params = [SHAPES, DTYPES, LAYOUTS, ["cbn", "numpy"]]
    param_names = ["shape", "dtype", "layout", "implementation"]
    unit = "x input size"

    def setup(self, shape, dtype, layout, implementation):
        self.d = common.case(shape, dtype, layout)
        self.rm, self.rv = common.running_stats(self.d)

    def _extra(self, op, implementation):
        _call(self.d, op, implementation, self.rm, self.rv)  # warm-up (lazy imports etc.)
        tracemalloc.start()
        try:
            result = _call(self.d, op, implementation, self.rm, self.rv)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        returned = sum(getattr(a, "nbytes", 0) for a in result)
        return round(max(0, peak - returned) / self.d.x.nbytes, 4)

    def track_extra_memory_training_forward(self, shape, dtype, layout, implementation):
        return self._extra("training", implementation)

    def track_extra_memory_eval_forward(self, shape, dtype, layout, implementation):
        return self._extra("eval", implementation)

    def track_extra_memory_backward(self, shape, dtype, layout, implementation):
        return self._extra("backward", implementation)
