"""cbn: batch normalization for NumPy arrays on the CPU.

OpenMP-parallel Cython kernels under a thin Python layer with PyTorch's semantics.
"""

from ._kernels import openmp_enabled
from ._state import load
from ._threads import get_num_threads, set_num_threads
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .fusion import fold
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "fold",
    "get_num_threads",
    "load",
    "openmp_enabled",
    "set_num_threads",
]
