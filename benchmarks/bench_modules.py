"""Module calls: cbn.BatchNorm1d/2d/3d, the way a layer in a network is called.

``numpy`` is a minimal module with the same state (weight, bias, running statistics) over
the NumPy reference. Skipped on commits of cbn without the module classes. cbn runs on one
thread (``cbn.set_num_threads(common.THREADS)``).
"""

import numpy as np

from . import common
from .common import DTYPES, EPS, IMPLEMENTATIONS, LAYOUTS, MOMENTUM, SHAPES

#: input ndim -> module class name
MODULE_FOR_NDIM = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


class ReferenceModule:
    """The state and calls of a BatchNorm module, computed by cbn._reference."""

    def __init__(self, num_features, dtype, axis):
        self.axis = axis
        self.weight = np.ones(num_features, dtype)
        self.bias = np.zeros(num_features, dtype)
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)
        self.training = True

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        y, self._mean, self._invstd = common._reference.batch_norm_forward(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.training,
            MOMENTUM, EPS, axis=self.axis)
        self._x = x
        return y

    def backward(self, grad_output):
        return common._reference.batch_norm_backward(
            grad_output, self._x, self.weight, self._mean, self._invstd, self.training,
            axis=self.axis)[0]


def make_module(implementation, ndim, num_features, dtype, axis):
    if implementation == "numpy":
        return ReferenceModule(num_features, dtype, axis)
    cls = getattr(common.cbn, MODULE_FOR_NDIM[ndim], None)
    if cls is None:
        raise NotImplementedError("this cbn has no module classes")
    common.cbn.set_num_threads(common.THREADS)
    kwargs = {"dtype": np.dtype(dtype)}
    if axis != 1:
        kwargs["axis"] = axis
    return cls(num_features, **kwargs)


class ModuleForward:
    params = [SHAPES, DTYPES, LAYOUTS, IMPLEMENTATIONS]
    param_names = ["shape", "dtype", "layout", "implementation"]

    def setup(self, shape, dtype, layout, implementation):
        d = self.d = common.case(shape, dtype, layout)
        self.train_module = make_module(implementation, len(d.shape), d.C, dtype, d.axis)
        self.train_module.train()
        self.eval_module = make_module(implementation, len(d.shape), d.C, dtype, d.axis)
        self.eval_module.eval()

    def time_module_training_forward(self, shape, dtype, layout, implementation):
        self.train_module(self.d.x)

    def time_module_eval_forward(self, shape, dtype, layout, implementation):
        self.eval_module(self.d.x)


class ModuleBackward:
    params = [SHAPES, DTYPES, LAYOUTS, IMPLEMENTATIONS]
    param_names = ["shape", "dtype", "layout", "implementation"]

    def setup(self, shape, dtype, layout, implementation):
        d = self.d = common.case(shape, dtype, layout)
        self.module = make_module(implementation, len(d.shape), d.C, dtype, d.axis)
        if not hasattr(self.module, "backward"):
            raise NotImplementedError("this cbn's modules have no backward")
        self.module.train()
        self.module(d.x)

    def time_module_backward(self, shape, dtype, layout, implementation):
        self.module.backward(self.d.g)
