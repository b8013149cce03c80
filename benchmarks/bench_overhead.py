"""Per-call overhead: tiny inputs, where a call costs what the Python layer around the
kernels costs. cbn recognises plain calls (contiguous arrays of the right dtype) in C and
skips its general validation path, so these track that fast path from commit to commit.
cbn runs on one thread (inputs this small always do)."""

from . import common
from .common import DTYPES, EPS, IMPLEMENTATIONS, MOMENTUM

#: (N, C) and (N, C, H, W), channels first.
TINY_SHAPES = ["8x16", "2x8x4x4"]


class SmallCall:
    params = [TINY_SHAPES, DTYPES, ["train", "eval", "backward"], IMPLEMENTATIONS]
    param_names = ["shape", "dtype", "op", "implementation"]

    def setup(self, shape, dtype, op, implementation):
        d = self.d = common.case(shape, dtype, "channels_first")
        fwd = common.FORWARD[implementation]
        bwd = common.BACKWARD[implementation]
        rm, rv = common.running_stats(d)
        if op == "train":
            self.call = lambda: fwd(d.x, d.w, d.b, rm, rv, True, MOMENTUM, EPS, axis=1,
                                    n_threads=1)
        elif op == "eval":
            self.call = lambda: fwd(d.x, d.w, d.b, d.rm, d.rv, False, MOMENTUM, EPS, axis=1,
                                    n_threads=1)
        else:
            self.call = lambda: bwd(d.g, d.x, d.w, d.save_mean, d.save_invstd, True, axis=1,
                                    n_threads=1)

    def time_small_call(self, shape, dtype, op, implementation):
        self.call()
