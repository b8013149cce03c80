"""Argument checks and dtype tables shared by :mod:`cbn.functional`, :mod:`cbn.modules` and
:mod:`cbn._state`, so that each rule (and its error message) lives in one place.

Nothing here touches data: these are the scalar checks done before any work starts.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["COMPUTE", "FLOAT_DTYPES", "HALF_DTYPES", "check_eps", "check_float_dtype",
           "check_index", "check_momentum", "is_half"]

_F32 = np.dtype(np.float32)
#: dtypes of parameters and buffers, and the dtypes the kernels compute in
FLOAT_DTYPES = (_F32, np.dtype(np.float64))
#: dtype of the computation for each supported input dtype (half types are computed in
#: float32); the bfloat16 of ml_dtypes is added when that package is importable.
COMPUTE: Dict[np.dtype, np.dtype] = {_F32: _F32, np.dtype(np.float64): np.dtype(np.float64),
                                     np.dtype(np.float16): _F32}
try:
    import ml_dtypes as _ml_dtypes
    COMPUTE[np.dtype(_ml_dtypes.bfloat16)] = _F32
except ImportError:                                  # optional
    pass
#: half-precision dtypes: stored in 16 bits, computed (and converted exactly) in float32
HALF_DTYPES = tuple(d for d, compute in COMPUTE.items() if d != compute)


def check_float_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as one of FLOAT_DTYPES (parameters, buffers, the compute dtypes), else a
    TypeError naming it.

    Examples
    --------
    >>> from cbn._checks import check_float_dtype
    >>> check_float_dtype("float64")
    dtype('float64')
    >>> check_float_dtype("float16")
    Traceback (most recent call last):
        ...
    TypeError: dtype must be float32 or float64, got float16
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def is_half(dtype: np.dtype) -> bool:
    """float16, or bfloat16 from ml_dtypes: stored in half precision, computed in float32."""
    return dtype in COMPUTE and COMPUTE[dtype] != dtype


def as_float(v: Any, name: str) -> float:
    """float(v) for a real number; an int too large for a float is a ValueError naming it.

    Examples
    --------
    >>> from cbn._checks import as_float
    >>> as_float(3, "eps")
    3.0
    >>> as_float(10**400, "eps")
    Traceback (most recent call last):
        ...
    ValueError: eps must be a finite number, got an int of 401 digits
    """
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an int of "
                         f"{len(str(abs(int(v))))} digits") from None


def check_eps(eps: Any) -> float:
    """``eps`` as a float: a finite non-negative real number (0 allowed)."""
    if type(eps) is float and 0.0 <= eps < math.inf:
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = as_float(eps, "eps")
    if not eps >= 0.0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite non-negative number, got {eps}")
    return eps


def check_momentum(momentum: Any, allow_none: bool = False) -> Optional[float]:
    """``momentum`` as a float: a finite real number (NaN or infinity would poison the
    running statistics). With ``allow_none``, None (the modules' cumulative moving
    average) is returned as is."""
    if type(momentum) is float and math.isfinite(momentum):
        return momentum
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        what = "a real number or None (cumulative moving average)" if allow_none else \
            "a real number"
        raise TypeError(f"momentum must be {what}, got {type(momentum).__name__}")
    momentum = as_float(momentum, "momentum")
    if not math.isfinite(momentum):
        raise ValueError(f"momentum must be finite, got {momentum}")
    return momentum


def check_index(value: Any, name: str) -> int:
    """``value`` as a Python int (anything with ``__index__`` but bool), else TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
