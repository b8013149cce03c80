"""The fused activations: names, their codes in the kernel core, and float64 formulas.

The kernels apply ``act(bn(x) + residual)`` in the output pass and multiply ``dy`` by
``act'`` in the backward's passes (cbn/src/cbn_act.h; the list is ``CBN_ACTIVATIONS`` in
cbn/include/cbn_core.h, whose order the codes below follow). Definitions are torch's:

=============  ==========================================  ============================
name           forward                                     derivative read from
=============  ==========================================  ============================
None           ``z``                                       -
"relu"         ``max(z, 0)``                               the forward's output
"relu6"        ``min(max(z, 0), 6)``                       the forward's output
"leaky_relu"   ``z if z > 0 else negative_slope * z``      the forward's output
"silu"         ``z * sigmoid(z)``                          ``z``, recomputed
"hardswish"    ``z * min(max(z + 3, 0), 6) / 6``           ``z``, recomputed
=============  ==========================================  ============================

The backward of relu, relu6 and leaky_relu reads the derivative off the forward's output
(``output=``), which needs ``negative_slope >= 0`` for leaky_relu (as torch's in-place
leaky_relu does); silu and hardswish recompute the pre-activation
``z = (x - mean) * weight * invstd + bias (+ residual)`` from the input in the same pass,
so their backward takes ``bias=`` and the forward's ``residual=``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ACTIVATIONS", "KINDS", "activation_kind", "check_negative_slope",
           "from_output", "apply"]

#: the accepted values of ``activation=``, in the core's order (cbn_act_kind)
ACTIVATIONS = (None, "relu", "relu6", "leaky_relu", "silu", "hardswish")
#: name -> the core's cbn_act_kind
KINDS = {name: code for code, name in enumerate(ACTIVATIONS)}
_FROM_OUTPUT = frozenset((1, 2, 3))


def activation_kind(activation) -> int:
    """The core's code of ``activation`` (ValueError naming the choices otherwise)."""
    try:
        return KINDS[activation]
    except (KeyError, TypeError):
        pass
    names = ", ".join(repr(a) for a in ACTIVATIONS)
    raise ValueError(f"activation must be one of {names}, got {activation!r}")


def check_negative_slope(negative_slope) -> float:
    """``negative_slope`` as a float: a finite real number."""
    if isinstance(negative_slope, (bool, np.bool_)) or not isinstance(
            negative_slope, (int, float, np.integer, np.floating)):
        raise TypeError("negative_slope must be a real number, got "
                        f"{type(negative_slope).__name__}")
    v = float(negative_slope)
    if not math.isfinite(v):
        raise ValueError(f"negative_slope must be finite, got {v}")
    return v


def from_output(kind: int) -> bool:
    """Whether the backward reads this activation's derivative off the forward's output
    (relu, relu6, leaky_relu); else it recomputes the pre-activation (silu, hardswish)."""
    return kind in _FROM_OUTPUT


def apply(z: np.ndarray, kind: int, negative_slope: float) -> np.ndarray:
    """``act(z)`` in NumPy (z's dtype), for the edge rescue of the forward."""
    if kind == 0:
        return z
    with np.errstate(all="ignore"):
        if kind == 1:
            return np.where(z < 0, 0, z).astype(z.dtype)
        if kind == 2:
            return np.where(z < 0, 0, np.where(z > 6, 6, z)).astype(z.dtype)
        if kind == 3:
            return np.where(z > 0, z, z * negative_slope).astype(z.dtype)
        if kind == 4:
            return (z / (1 + np.exp(-z))).astype(z.dtype)
        if kind == 5:
            return (z * np.clip(z + 3, 0, 6) / 6).astype(z.dtype)
    raise ValueError(f"unknown activation code {kind}")
