"""Speed-up of cbn over the NumPy reference, measured inside one benchmark.

A ratio of two times taken in the same process, alternately, is far steadier on a shared
machine than two separate asv timings; these are the figures to watch across commits.
cbn runs on one thread here (n_threads=1): a per-core comparison with single-threaded NumPy,
and one that a busy neighbour on the machine cannot turn into a wait for a second core.
"""

from . import common
from .common import DTYPES, EPS, LAYOUTS, MOMENTUM, SHAPES


class SpeedupOverNumpy:
    params = [SHAPES, DTYPES, LAYOUTS]
    param_names = ["shape", "dtype", "layout"]
    unit = "x"
    timeout = 180

    def setup(self, shape, dtype, layout):
        self.d = common.case(shape, dtype, layout)

    def _forward(self, training):
        d = self.d
        calls = []
        for impl in ("numpy", "cbn"):
            fwd = common.FORWARD[impl]
            rm, rv = common.running_stats(d)
            calls.append(lambda fwd=fwd, rm=rm, rv=rv: fwd(d.x, d.w, d.b, rm, rv, training,
                                                           MOMENTUM, EPS, axis=d.axis,
                                                           n_threads=1))
        return common.speedup(*calls)

    def track_speedup_training_forward(self, shape, dtype, layout):
        return self._forward(True)

    def track_speedup_eval_forward(self, shape, dtype, layout):
        return self._forward(False)

    def track_speedup_backward(self, shape, dtype, layout):
        d = self.d
        calls = [lambda bwd=common.BACKWARD[impl]: bwd(d.g, d.x, d.w, d.save_mean,
                                                       d.save_invstd, True, axis=d.axis,
                                                       n_threads=1)
                 for impl in ("numpy", "cbn")]
        return common.speedup(*calls)
