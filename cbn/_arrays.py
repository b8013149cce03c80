"""How arrays reach the kernels: the input and per-channel checks, and the canonical view.

Shared by :mod:`cbn.functional` (the public calls) and :mod:`cbn._stages` (the stages one at
a time). The canonical view: whatever its ndim and channel axis, an input is walked in
memory order, outermost axis first; the axes before the channel axis multiply into M, those
after it into K, so the data is a C-contiguous (M, C, K) array. NCHW is (N, C, H*W),
channels-last (NHWC, or NCHW in PyTorch's channels_last format) is (N*H*W, C, 1).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import _kernels
from ._checks import COMPUTE, is_half

__all__ = ["ACTIVATIONS", "View", "as_input", "channel_axis", "check_activation",
           "contiguous", "foreign", "memory_order", "per_channel", "read_input", "result_type",
           "same_shape", "split_out", "to_numpy"]

#: the fused activations the kernels know
ACTIVATIONS = (None, "relu")


# ------------------------------------------------------------ foreign arrays (DLPack)
#
# An array of another library (a torch tensor, a JAX array, anything that exports
# ``__dlpack__``) is read through a NumPy view of its memory, never a copy, and the results
# of a call take the type of its input. torch and JAX are recognised from ``sys.modules``:
# neither is imported here (an array of theirs can only exist once they are imported).

#: DLPack device types whose memory the CPU reads (DLDeviceType: kDLCPU, kDLCUDAHost,
#: kDLROCMHost)
_HOST_DEVICES = frozenset((1, 3, 11))
#: names of the other DLPack device types, for the error message
_DEVICE_NAMES = {2: "cuda", 4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi", 10: "rocm",
                 12: "ext_dev", 13: "cuda_managed", 14: "oneapi", 15: "webgpu",
                 16: "hexagon", 17: "maia"}


def foreign(a: Any) -> bool:
    """True for an array of another library: not a NumPy array, but exports ``__dlpack__``
    (torch, JAX, array-api-strict, CuPy, ...). Such arrays are read through
    :func:`to_numpy` and give their type to the results (see :func:`result_type`)."""
    return (a is not None and type(a) is not np.ndarray and hasattr(type(a), "__dlpack__")
            and not isinstance(a, np.ndarray))


def _torch_view(a, name: str, torch) -> np.ndarray:
    """NumPy view of a CPU torch tensor (bfloat16 through ml_dtypes), never a copy."""
    if not a.is_cpu:
        raise TypeError(f"{name} is a torch tensor on device {a.device}; cbn computes on "
                        f"the CPU: pass {name}.cpu()")
    if a.requires_grad:
        raise TypeError(f"{name} is a torch tensor that requires grad; cbn does not record "
                        f"autograd graphs: pass {name}.detach() (cbn.batch_norm_backward "
                        f"computes the gradients)")
    try:
        if a.dtype is torch.bfloat16:
            return a.view(torch.int16).numpy().view(bfloat16(name))
        return a.numpy()
    except (RuntimeError, TypeError) as e:       # sparse, conjugate, quantized, ...
        raise TypeError(f"{name}: cbn cannot read this torch tensor as an array ({e})") \
            from None


def bfloat16(name: str) -> np.dtype:
    """ml_dtypes' bfloat16, through which cbn reads bfloat16 arrays of other libraries
    (NumPy has none); a TypeError naming ``name`` without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(f"{name} is bfloat16, which cbn reads through ml_dtypes' bfloat16 "
                        f"(NumPy has none): pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


def to_numpy(a: Any, name: str, writable: bool = False) -> Any:
    """A NumPy view of a foreign array's memory (no copy); anything else as it is.

    A tensor on a device the CPU cannot read, a torch tensor that requires grad, or an
    array that cannot be read as one raises TypeError naming ``name``. With ``writable``
    (``out``, running statistics updated in place), a read-only array (a JAX array, which
    is immutable) is refused too.
    """
    if a is None or type(a) is np.ndarray:
        return a
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        try:
            # the common case, about 0.5 us; numpy() refuses a tensor that requires grad,
            # is not on the CPU or is bfloat16: _torch_view explains or reads it
            v = a.numpy()
        except (RuntimeError, TypeError):
            v = _torch_view(a, name, torch)
        if not writable:
            return v
    elif not foreign(a):
        return a
    else:
        try:
            dev, dev_id = a.__dlpack_device__()
        except Exception:                                # no device: let DLPack decide
            dev = dev_id = None
        if dev is not None and int(dev) not in _HOST_DEVICES:
            where = _DEVICE_NAMES.get(int(dev), f"DLPack device type {int(dev)}")
            raise TypeError(f"{name} is on device {where}:{dev_id}; cbn computes on the "
                            f"CPU: copy it to the CPU first")
        try:
            v = np.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            # e.g. a JAX bfloat16 array: DLPack has no NumPy dtype for it, but __array__
            # gives an ml_dtypes view of the same memory
            if getattr(a, "dtype", None) is not None and "bfloat16" in str(a.dtype):
                bfloat16(name)
                if hasattr(a, "__array__"):
                    v = np.asarray(a)
                else:
                    raise TypeError(f"{name}: cbn cannot read a bfloat16 {type(a).__name__} "
                                    f"through DLPack ({e})") from None
            else:
                raise TypeError(f"{name}: cbn cannot read this {type(a).__name__} through "
                                f"DLPack ({e})") from None
    if writable:
        if not v.flags.writeable:
            raise TypeError(f"{name} is written in place, but this {type(a).__name__} is "
                            f"read-only (JAX arrays are immutable)")
        if v.size > 1 and 0 in v.strides:
            raise TypeError(f"{name} is written in place, but several of its elements share "
                            f"one memory location (an expanded or broadcast array)")
    return v


def read_input(a: Any, name: str = "input") -> Tuple[Any, Optional[Callable[[np.ndarray], Any]]]:
    """``(to_numpy(a, name), result_type(a))`` in one look at ``a``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        try:
            # as in to_numpy; the results of a float input are float: from_numpy itself
            return a.numpy(), torch.from_numpy
        except (RuntimeError, TypeError):
            return _torch_view(a, name, torch), _to_torch
    return to_numpy(a, name), result_type(a)


def result_type(a: Any) -> Optional[Callable[[np.ndarray], Any]]:
    """How a call's results take the type of its input ``a``: None for NumPy (and for
    anything that is not a foreign array), else a function from a NumPy result to the
    input's library's array: ``torch.from_numpy`` (no copy) for torch, ``jax.numpy.asarray``
    for JAX, ``from_dlpack`` of ``a.__array_namespace__()`` for other array-API arrays. An
    exporter with neither (only ``__dlpack__``) gets NumPy arrays: cbn has no way to build
    one of its objects."""
    if not foreign(a):
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return _to_torch
    get = getattr(a, "__array_namespace__", None)
    if get is None:
        return None
    xp = get()
    if xp.__name__.startswith("jax"):
        return xp.asarray

    def to_xp(y: np.ndarray):
        try:
            return xp.from_dlpack(y)
        except Exception:                                  # e.g. a dtype DLPack lacks
            return xp.asarray(y)
    return to_xp


def _to_torch(y: np.ndarray):
    """A torch tensor of ``y``'s memory (bfloat16 for ml_dtypes' bfloat16)."""
    torch = sys.modules["torch"]
    if y.dtype.kind != "V":
        return torch.from_numpy(y)
    return torch.from_numpy(y.view(np.int16)).view(torch.bfloat16)      # bfloat16


def split_out(out: Any, n: int) -> List[Any]:
    """``out=`` as a list of ``n`` entries, one per returned value: a tuple of ``n`` arrays
    (or None) as NumPy's multi-output ufuncs take, or one array (or None) for the first."""
    if type(out) is tuple:
        if len(out) != n:
            raise ValueError(f"out must be an array or a tuple of {n} (one array or None "
                             f"per returned value), got a tuple of {len(out)}")
        return list(out)
    return [out] + [None] * (n - 1)


def out_names(out: Any, n: int) -> Sequence[str]:
    """How errors name the entries of ``out``: "out" for one array, "out[i]" in a tuple."""
    if type(out) is tuple:
        return [f"out[{i}]" for i in range(n)]
    return ["out"] + [f"out[{i}]" for i in range(1, n)]


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


def read_in_place(x: np.ndarray, *companions: Any) -> bool:
    """Whether the kernels read ``x`` and the arrays that accompany it (residual,
    grad_output, output; None: absent) in x's own dtype: float32 and float64 always,
    half precision (float16, ml_dtypes' bfloat16) when every companion is of x's dtype
    (the loops convert in registers). Otherwise a half input and its companions are
    converted to float32 first: the same values, one more pass."""
    return not is_half(x.dtype) or all(c is None or getattr(c, "dtype", None) == x.dtype
                                       for c in companions)


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
