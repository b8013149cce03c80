"""Argument checks and dtype tables shared by :mod:`cbn.functional`, :mod:`cbn.modules` and
:mod:`cbn._state`, so that each rule (and its error message) lives in one place.

Nothing here touches data: these are the scalar checks done before any work starts.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["COMPUTE", "FLOAT_DTYPES", "HALF_DTYPES", "check_eps", "check_float_dtype",
           "check_index", "check_momentum", "is_half"]

_F32 = np.dtype(np.float32)
#: dtypes of parameters and buffers, and the dtypes the kernels compute in
FLOAT_DTYPES = (_F32, np.dtype(np.float64))
#: dtype of the computation for each supported input dtype (half types are computed in
#: float32); the bfloat16 of ml_dtypes is added when that package is imported.
COMPUTE: Dict[np.dtype, np.dtype] = {_F32: _F32, np.dtype(np.float64): np.dtype(np.float64),
                                     np.dtype(np.float16): _F32}
#: half-precision dtypes: stored in 16 bits, computed (and converted exactly) in float32.
#: A list, so that bfloat16 can join it when ml_dtypes is imported (see below).
HALF_DTYPES: List[np.dtype] = [np.dtype(np.float16)]


def _add_ml_dtypes(module: Any) -> None:
    """Add ml_dtypes' bfloat16 to COMPUTE and HALF_DTYPES (once)."""
    bf16 = np.dtype(module.bfloat16)
    if bf16 not in COMPUTE:
        COMPUTE[bf16] = _F32
        HALF_DTYPES.append(bf16)
        from . import _kernels              # its loops read bfloat16 storage natively
        _kernels.set_bfloat16_typenum(bf16.num)


class _MlDtypesHook:
    """A finder on ``sys.meta_path`` that adds bfloat16 when ml_dtypes is imported.

    Importing ml_dtypes costs about half a second, and an array of its bfloat16 cannot exist
    before the package is imported, so cbn does not import it: if it is already imported,
    bfloat16 is added now; otherwise this finder (first on ``sys.meta_path`` until then)
    lets the other finders find ml_dtypes and adds bfloat16 once its module has run. It
    answers no other import, and removes itself after ml_dtypes.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "ml_dtypes":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is None:
            return None
        hook = self

        def exec_then_add(module):           # on this spec's own loader instance only
            exec_module(module)
            hook.remove()
            try:
                _add_ml_dtypes(module)
            except Exception:                # an ml_dtypes without bfloat16: no bfloat16
                pass

        try:
            spec.loader.exec_module = exec_then_add
        except AttributeError:               # a loader that takes no attributes: leave it
            return None
        return spec

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


if "ml_dtypes" in sys.modules:
    _add_ml_dtypes(sys.modules["ml_dtypes"])
else:
    sys.meta_path.insert(0, _MlDtypesHook())


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
