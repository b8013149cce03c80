"""cbn on several threads: the forward and backward of bench_forward/bench_backward, in
float32 (the thread scaling of float64 is the same story), with the thread count as a
parameter (``CBN_ASV_MULTI_THREADS``, default 2; e.g. ``2,4``).

Every other benchmark runs cbn on one thread. Here the count is part of each result's
name (``time_training_forward(..., 2)``), so multi-thread figures never mix with the
one-thread ones, and a dashboard shows a count only for the machines that ran it. On a
shared machine these are the noisy ones: a team of threads waits for cores that other
processes hold.
"""

from . import common
from .common import EPS, LAYOUTS, MOMENTUM, MULTI_THREADS, SHAPES


class MultiThread:
    params = [SHAPES, ["float32"], LAYOUTS, MULTI_THREADS]
    param_names = ["shape", "dtype", "layout", "threads"]

    def setup(self, shape, dtype, layout, threads):
        self.d = common.case(shape, dtype, layout)
        self.rm, self.rv = common.running_stats(self.d)

    def time_training_forward(self, shape, dtype, layout, threads):
        d = self.d
        common.cbn.batch_norm_forward(d.x, d.w, d.b, self.rm, self.rv, True, MOMENTUM, EPS,
                                      axis=d.axis, n_threads=threads)

    def time_eval_forward(self, shape, dtype, layout, threads):
        d = self.d
        common.cbn.batch_norm_forward(d.x, d.w, d.b, d.rm, d.rv, False, MOMENTUM, EPS,
                                      axis=d.axis, n_threads=threads)

    def time_backward(self, shape, dtype, layout, threads):
        d = self.d
        common.cbn.batch_norm_backward(d.g, d.x, d.w, d.save_mean, d.save_invstd, True,
                                       axis=d.axis, n_threads=threads)
