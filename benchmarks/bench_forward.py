"""Forward pass: training (batch statistics + running-stat update) and eval.

Both implementations are called the way a user calls them: the output is allocated by the
call. cbn runs on one thread (``common.THREADS``; several threads: bench_threads), the NumPy
reference is single-threaded.
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


class FusedForward:
    """relu(bn(x) + residual): cbn fused in its one output pass, against cbn followed by
    the add and the ReLU as NumPy in-place operations (two more passes), and NumPy.
    The fused forward should cost about what the plain forward costs (same passes, one
    more input stream) and less than the unfused sequence."""

    params = [SHAPES, DTYPES, LAYOUTS, ["cbn", "cbn+numpy", "numpy"], [True, False]]
    param_names = ["shape", "dtype", "layout", "implementation", "training"]

    def setup(self, shape, dtype, layout, implementation, training):
        import inspect

        import numpy as np

        import cbn
        if "activation" not in inspect.signature(cbn.batch_norm_forward).parameters:
            raise NotImplementedError("this cbn has no fused activation")
        self.d = d = common.case(shape, dtype, layout)
        self.rm, self.rv = common.running_stats(d)
        residual = d.g              # any array of x's shape serves as the residual
        fwd = common.FORWARD["numpy" if implementation == "numpy" else "cbn"]

        def fused():
            cbn.batch_norm_forward(d.x, d.w, d.b, self.rm, self.rv, training, MOMENTUM, EPS,
                                   axis=d.axis, n_threads=THREADS, activation="relu",
                                   residual=residual)

        def unfused():
            y = fwd(d.x, d.w, d.b, self.rm, self.rv, training, MOMENTUM, EPS, axis=d.axis,
                    n_threads=THREADS)[0]
            np.add(y, residual, out=y)
            np.maximum(y, 0, out=y)

        self.call = fused if implementation == "cbn" else unfused

    def time_fused_forward(self, shape, dtype, layout, implementation, training):
        self.call()
