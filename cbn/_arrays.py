"""How arrays reach the kernels: the input and per-channel checks, and the canonical view.

Shared by :mod:`cbn.functional` (the public calls) and :mod:`cbn._stages` (the stages one at
a time). The canonical view: whatever its ndim and channel axis, an input is walked in
memory order, outermost axis first; the axes before the channel axis multiply into M, those
after it into K, so the data is a C-contiguous (M, C, K) array. NCHW is (N, C, H*W),
channels-last (NHWC, or NCHW in PyTorch's channels_last format) is (N*H*W, C, 1).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from . import _kernels
from ._checks import COMPUTE, is_half

__all__ = ["ACTIVATIONS", "View", "as_input", "channel_axis", "check_activation",
           "contiguous", "memory_order", "per_channel", "same_shape"]

#: the fused activations the kernels know
ACTIVATIONS = (None, "relu")


def as_input(a, name: str) -> np.ndarray:
    x = a if isinstance(a, np.ndarray) else np.asarray(a)
    if x.dtype not in COMPUTE:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 array, "
                        f"got dtype {x.dtype}")
    if not 2 <= x.ndim <= 5:
        raise ValueError(f"expected 2D to 5D input (got {x.ndim}D input)")
    return x
def channel_axis(axis, ndim: int) -> int:
    """The channel axis as a non-negative int; AxisError (a ValueError) if out of range."""
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    if isinstance(axis, bool):
        raise TypeError("axis must be an int, got bool")
    try:
        axis = np.lib.array_utils.normalize_axis_index(axis, ndim)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
    except OverflowError:                       # an int too large for C: out of range
        raise np.exceptions.AxisError(f"axis {axis} is out of bounds for array of "
                                      f"dimension {ndim}") from None
    return axis
def per_channel(a, name: str, C: int, dtype) -> Optional[np.ndarray]:
    """A per-channel vector (weight, bias, saved stats): any array-like of C values."""
    if a is None:
        return None
    if (type(a) is np.ndarray and a.dtype == dtype and a.shape == (C,)
            and a.flags.c_contiguous and a.flags.aligned):
        return a
    v = np.asarray(a)
    if v.dtype.kind not in "fiub" and not is_half(v.dtype):
        raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
    if v.size != C:
        raise ValueError(f"{name} should contain {C} elements not {v.size}")
    return contiguous(v.reshape(C), dtype)


def check_activation(activation) -> bool:
    """True for ReLU, False for none."""
    if activation is None:
        return False
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"
def same_shape(a, name: str, x: np.ndarray, dtype) -> np.ndarray:
    """An array that accompanies the input (residual, output): same shape, float."""
    v = a if isinstance(a, np.ndarray) else np.asarray(a)
    if v.dtype.kind != "f" and not is_half(v.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {v.dtype}")
    if v.shape != x.shape:
        raise ValueError(f"{name} has shape {v.shape}, expected the input's shape {x.shape}")
    return v if v.dtype == dtype else v.astype(dtype)


def memory_order(x: np.ndarray) -> Tuple[int, ...]:
    """Axes of ``x`` from the largest stride to the smallest (ties keep axis order)."""
    return tuple(sorted(range(x.ndim), key=lambda i: (-abs(x.strides[i]), i)))


def contiguous(a: np.ndarray, dtype=None) -> np.ndarray:
    """``a`` as a C-contiguous array aligned to its element size, of ``dtype`` (default:
    its own), copied only if it is not one already."""
    t = np.ascontiguousarray(a, dtype=dtype)
    return t if t.flags.aligned else np.array(t, order="C", copy=True)


class View:
    """How an input maps onto the kernels' C-contiguous (M, C, K) view."""

    __slots__ = ("perm", "shape", "M", "C", "K")

    def __init__(self, x: np.ndarray, axis: int):
        shape = x.shape
        if x.flags.c_contiguous:
            self.perm = None                     # the common case: no permutation
            self.shape = shape
            p = axis
        else:
            perm = memory_order(x)
            self.perm = perm
            self.shape = tuple(shape[i] for i in perm)
            p = perm.index(axis)
        self.M = math.prod(self.shape[:p])
        self.C = shape[axis]
        self.K = math.prod(self.shape[p + 1:])

    def read(self, a: np.ndarray) -> np.ndarray:
        """(M, C, K) view of ``a`` (same shape as the input), copying only if it must: when
        its layout is not a permutation of a contiguous block, or its data is not aligned
        to its element size (the kernels' C loops need aligned elements)."""
        t = a if self.perm is None else a.transpose(self.perm)
        if not t.flags.c_contiguous or not t.flags.aligned:
            t = np.array(t, order="C", copy=True)
        return t.reshape(self.M, self.C, self.K)

    def direct(self, out: np.ndarray) -> Optional[np.ndarray]:
        """(M, C, K) view of ``out`` if it can be written directly (contiguous in the
        input's memory order, aligned), else None."""
        t = out if self.perm is None else out.transpose(self.perm)
        if not (t.flags.c_contiguous and t.flags.aligned):
            return None
        return t.reshape(self.M, self.C, self.K)

    def new(self, dtype) -> Tuple[np.ndarray, np.ndarray]:
        """A new array in the input's memory order: (array in input axes, its 3D view)."""
        buf = _kernels.empty(self.shape, dtype)          # large ones: the output pool
        y3 = buf.reshape(self.M, self.C, self.K)
        if self.perm is None:
            return buf, y3
        return buf.transpose(np.argsort(self.perm)), y3
