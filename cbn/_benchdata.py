"""The benchmark data of cbn: one recipe for the arrays, one name for each layout, one
spelling of a shape; shared by ``python -m cbn bench`` (:mod:`cbn._bench`) and the asv
suite (``benchmarks/common.py``).

Like :mod:`cbn._timing`, this module imports NumPy and the standard library only, never cbn:
the asv suite loads this file from its own checkout by path, so that the data (and so the
figures) are the same whichever commit of cbn it measures.

Layouts. ``channels_first`` is the array as its logical shape says, (N, C, *spatial), with
``axis=1``; ``channels_last`` is the same logical shape stored as (N, *spatial, C), with
``axis=-1`` (PyTorch's ``channels_last`` memory format). A 2D input (N, C) has one layout,
``channels_first``. Tables print them short, as ``first`` and ``last``; the command line
also takes ``nchw``, ``nhwc``, ``channels-first`` and ``channels-last``.
"""

from __future__ import annotations

import types
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ["LAYOUTS", "SHORT", "parse_layout", "parse_shape", "case_name", "array_shape",
           "layout_applies", "param_dtype", "make_case", "RESNET50_BN"]

#: The layouts, by their one name.
LAYOUTS: Tuple[str, ...] = ("channels_first", "channels_last")
#: How a table cell shows a layout.
SHORT: Dict[str, str] = {"channels_first": "first", "channels_last": "last"}
_ALIASES: Dict[str, str] = {"nchw": "channels_first", "nhwc": "channels_last",
                            "channels-first": "channels_first",
                            "channels-last": "channels_last",
                            "first": "channels_first", "last": "channels_last"}

#: The 53 BatchNorm2d layers of torchvision's ResNet-50 (stride on the 3x3 convolution) on
#: a 224x224 input: (C, H, W) and how many layers have that input shape.
RESNET50_BN: Tuple[Tuple[Tuple[int, int, int], int], ...] = (
    ((64, 112, 112), 1),                                   # stem
    ((64, 56, 56), 6), ((256, 56, 56), 4),                 # layer1: 3 blocks + downsample
    ((128, 56, 56), 1), ((128, 28, 28), 7), ((512, 28, 28), 5),      # layer2: 4 blocks
    ((256, 28, 28), 1), ((256, 14, 14), 11), ((1024, 14, 14), 7),    # layer3: 6 blocks
    ((512, 14, 14), 1), ((512, 7, 7), 5), ((2048, 7, 7), 4),         # layer4: 3 blocks
)


def parse_layout(text: str) -> str:
    """The layout named by ``text`` (a name of LAYOUTS or an alias), else ValueError."""
    key = str(text).strip().lower()
    if key in LAYOUTS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown layout {text!r}: choose from {', '.join(LAYOUTS)} "
                     f"(or {', '.join(sorted(_ALIASES))})")


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"32x64x56x56"`` (also with commas or parentheses) as a tuple of ints."""
    parts = str(text).lower().replace(",", "x").replace("(", "").replace(")", "").split("x")
    try:
        return tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected e.g. 32x64x56x56") from None


def case_name(shape: Sequence[int]) -> str:
    """``(32, 64, 56, 56)`` as ``"32x64x56x56"``."""
    return "x".join(str(int(s)) for s in shape)


def layout_applies(shape: Sequence[int], layout: str) -> bool:
    """False for ``channels_last`` of a 2D shape (the same array as ``channels_first``)."""
    return not (layout == "channels_last" and len(shape) == 2)


def array_shape(shape: Sequence[int], layout: str) -> Tuple[Tuple[int, ...], int]:
    """(shape of the stored array, channel axis) for a logical (N, C, *spatial) shape."""
    if layout == "channels_last" and len(shape) > 2:
        return (shape[0],) + tuple(shape[2:]) + (shape[1],), -1
    return tuple(shape), 1


def param_dtype(dtype) -> np.dtype:
    """The dtype of weights and running statistics for inputs of ``dtype``: float32 for the
    half types (float16, bfloat16), computed in float32 as in PyTorch; the dtype itself
    otherwise."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def _normal(rng: np.random.Generator, shape, dtype: np.dtype) -> np.ndarray:
    if dtype in (np.float32, np.float64):
        return rng.standard_normal(shape, dtype=dtype)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def make_case(shape: Sequence[int], dtype, layout: str = "channels_first", seed: int = 0,
              residual: bool = False) -> types.SimpleNamespace:
    """The arrays of one benchmark case, always drawn the same way.

    ``shape`` is the logical (N, C, *spatial) shape, ``layout`` one of LAYOUTS. Returns a
    namespace with ``x`` (input, values ~ N(0.5, 2^2)), ``g`` (an upstream gradient ~
    N(0, 1)), ``w``, ``b`` (affine parameters), ``rm``, ``rv`` (initial running statistics:
    copy them before a training call), ``save_mean``, ``save_invstd`` (x's distribution's
    mean and 1/std, 0.5 and 0.5: no pass over x, so no temporaries that would show in the
    asv suite's peak memory), ``r`` (a residual like ``x``, or None), ``axis``, ``C`` and
    ``shape``. Parameters are in :func:`param_dtype`. x and g are made in place, without
    temporaries (float32/float64).
    """
    shape = tuple(int(s) for s in shape)
    ashape, axis = array_shape(shape, layout)
    dtype = np.dtype(dtype)
    pdtype = param_dtype(dtype)
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = _normal(rng, ashape, dtype)
    x *= 2
    x += 0.5
    g = _normal(rng, ashape, dtype)
    w = rng.uniform(0.5, 1.5, C).astype(pdtype)
    b = rng.standard_normal(C).astype(pdtype)
    rm = (0.1 * rng.standard_normal(C)).astype(pdtype)
    rv = rng.uniform(0.5, 2.0, C).astype(pdtype)
    r: Optional[np.ndarray] = _normal(rng, ashape, dtype) if residual else None
    save_mean = np.full(C, 0.5, dtype=pdtype)
    save_invstd = np.full(C, 0.5, dtype=pdtype)
    return types.SimpleNamespace(x=x, g=g, w=w, b=b, rm=rm, rv=rv, save_mean=save_mean,
                                 save_invstd=save_invstd, r=r, axis=axis, C=C, shape=shape)
