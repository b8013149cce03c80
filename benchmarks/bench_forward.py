"""Forward pass: training (batch statistics + running-stat update) and eval.

Both implementations are called the way a user calls them: the output is allocated by the
call. cbn runs on CBN_ASV_THREADS threads if set, else its default (OMP_NUM_THREADS,
threadpoolctl); the NumPy reference is single-threaded.
"""

from . import common
from .common import DTYPES, EPS, IMPLEMENTATIONS, LAYOUTS, MOMENTUM, SHAPES, THREADS

PARAMS = [SHAPES, DTYPES, LAYOUTS, IMPLEMENTATIONS]
PARAM_NAMES = ["shape", "dtype", "layout", "implementation"]


class TrainingForward:
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, shape, dtype, layout, implementation):
        self.d = common.case(shape, dtype, layout)
        self.fwd = common.FORWARD[implementation]
        self.rm, self.rv = common.running_stats(self.d)

    def time_training_forward(self, shape, dtype, layout, implementation):
        d = self.d
        self.fwd(d.x, d.w, d.b, self.rm, self.rv, True, MOMENTUM, EPS, axis=d.axis,
                 n_threads=THREADS)


class EvalForward:
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, shape, dtype, layout, implementation):
        self.d = common.case(shape, dtype, layout)
        self.fwd = common.FORWARD[implementation]

    def time_eval_forward(self, shape, dtype, layout, implementation):
        d = self.d
        self.fwd(d.x, d.w, d.b, d.rm, d.rv, False, MOMENTUM, EPS, axis=d.axis,
                 n_threads=THREADS)

