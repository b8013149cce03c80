"""cbn: batch normalization for NumPy arrays on the CPU.

OpenMP-parallel Cython kernels under a thin Python layer with PyTorch's semantics.

Functions: :func:`batch_norm` (the arguments of ``torch.nn.functional.batch_norm``),
:func:`batch_norm_forward` and :func:`batch_norm_backward` (ATen's ``native_batch_norm``
and its backward), :func:`fold`; modules :class:`BatchNorm1d`, :class:`BatchNorm2d`,
:class:`BatchNorm3d` and :class:`BatchNorm` with PyTorch's state, :func:`load`; threads:
:func:`set_num_threads`, :func:`get_num_threads`, :func:`openmp_enabled`; memory:
:func:`output_pool`; the build: :func:`show_config`.

Examples
--------
>>> import numpy as np
>>> import cbn
>>> isinstance(cbn.__version__, str), isinstance(cbn.openmp_enabled(), bool)
(True, True)
>>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
>>> y = cbn.BatchNorm2d(3)(x)
>>> np.allclose(y, cbn.batch_norm(x, None, None, training=True))
True
"""

from ._config import show_config
from ._kernels import capi, openmp_enabled, output_pool
from ._state import load
from ._threads import get_num_threads, set_num_threads
from .distributed import SyncBatchNorm, precise_statistics
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .fusion import fold
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"


def get_include() -> str:
    """The folder of cbn's C headers (``cbn.h``, the C ABI): for ``include_dirs`` when
    building C, C++ or Cython code against cbn (see ``cbn.capi``).

    Examples
    --------
    >>> import os, cbn
    >>> os.path.isfile(os.path.join(cbn.get_include(), "cbn.h"))
    True
    """
    import os
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "capi",
    "fold",
    "get_include",
    "get_num_threads",
    "load",
    "openmp_enabled",
    "output_pool",
    "precise_statistics",
    "set_num_threads",
    "show_config",
]
