"""Backward pass in training mode: (grad_input, grad_weight, grad_bias) from the batch
statistics saved by a training forward. cbn runs on one thread (``common.THREADS``)."""

from . import common
from .common import DTYPES, IMPLEMENTATIONS, LAYOUTS, SHAPES, THREADS


class Backward:
    params = [SHAPES, DTYPES, LAYOUTS, IMPLEMENTATIONS]
    param_names = ["shape", "dtype", "layout", "implementation"]

    def setup(self, shape, dtype, layout, implementation):
        self.d = common.case(shape, dtype, layout)
        self.bwd = common.BACKWARD[implementation]

    def time_backward(self, shape, dtype, layout, implementation):
        d = self.d
        self.bwd(d.g, d.x, d.w, d.save_mean, d.save_invstd, True, axis=d.axis,
                 n_threads=THREADS)
