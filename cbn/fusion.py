"""Folding an eval-mode batch normalization into the layer before it.

For inference, ``bn(conv(x))`` with frozen statistics is one affine map per output channel,
so the BN can be folded into the convolution's (or linear layer's) weight and bias, as
``torch.nn.utils.fusion.fuse_conv_bn_weights`` does::

    s = gamma / sqrt(running_var + eps)
    W' = W * s          (along the output-channel axis)
    b' = (b - running_mean) * s + beta
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["fold"]


def fold(weight: ArrayLike, bias: Optional[ArrayLike], bn: Any, *,
         transpose: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode batch normalization into the weight and bias of the layer before it.

    Parameters
    ----------
    weight : array, ndim >= 2
        Weight of a Linear ``(out, in)`` or Conv ``(out, in, *kernel)`` layer; with
        ``transpose=True``, of a ConvTranspose ``(in, out, *kernel)``.
    bias : array of ``out`` values, or None (zeros)
    bn : :class:`cbn.BatchNorm` (or anything with ``running_mean``, ``running_var``,
        ``eps``, ``weight`` and ``bias`` attributes, such as a torch module's numpy copy)
        Its running statistics are used (what eval mode computes).
    transpose : bool, keyword-only
        Output channels on axis 1 instead of 0.

    Returns
    -------
    (fused_weight, fused_bias) in the dtypes of ``weight`` (and ``bias``, or of the BN's
    running mean when ``bias`` is None), computed in float64.

    Raises
    ------
    ValueError
        A weight with fewer than 2 dimensions, a batch norm without running statistics, or
        channel counts that do not match.
    TypeError
        A weight that is not floating point.

    See Also
    --------
    BatchNorm.fold_into : The same, called on the module.

    Examples
    --------
    A Linear layer (4 inputs, 3 outputs) followed by an eval-mode BatchNorm1d(3):

    >>> import numpy as np
    >>> import cbn
    >>> rng = np.random.default_rng(0)
    >>> W, b = rng.standard_normal((3, 4)), rng.standard_normal(3)
    >>> bn = cbn.BatchNorm1d(3, dtype=np.float64)
    >>> _ = bn(rng.normal(2.0, 3.0, (64, 3)))          # one training step: running stats
    >>> bn.eval()
    BatchNorm1d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, dtype=float64)
    >>> W_fused, b_fused = cbn.fold(W, b, bn)
    >>> x = rng.standard_normal((5, 4))
    >>> np.allclose(x @ W_fused.T + b_fused, bn(x @ W.T + b))
    True

    A convolution's weight ``(out, in, kh, kw)`` folds along its first axis:

    >>> W_conv = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    >>> W_fused, b_fused = cbn.fold(W_conv, None, bn)
    >>> W_fused.shape, W_fused.dtype, b_fused.dtype
    ((3, 2, 3, 3), dtype('float32'), dtype('float64'))
    """
    w = np.asarray(weight)
    if w.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {w.shape}")
    if w.dtype.kind != "f":
        raise TypeError(f"weight must be a floating-point array, got dtype {w.dtype}")
    rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if rm is None or rv is None:
        raise ValueError("fold needs the batch norm's running statistics "
                         "(a module with track_running_stats=False has none)")
    rm = np.asarray(rm, dtype=np.float64).reshape(-1)
    rv = np.asarray(rv, dtype=np.float64).reshape(-1)
    axis = 1 if transpose else 0
    C = w.shape[axis]
    if rm.size != C or rv.size != C:
        raise ValueError(f"the batch norm has {rm.size} channels, the weight has {C} output "
                         f"channels on axis {axis}")
    gamma = getattr(bn, "weight", None)
    beta = getattr(bn, "bias", None)
    gamma = np.ones(C) if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(C)
    beta = np.zeros(C) if beta is None else np.asarray(beta, dtype=np.float64).reshape(C)
    if bias is None:
        b = np.zeros(C)
        bias_dtype = np.asarray(getattr(bn, "running_mean")).dtype
    else:
        b = np.asarray(bias)
        if b.size != C:
            raise ValueError(f"bias should contain {C} elements not {b.size}")
        bias_dtype = b.dtype
        b = b.astype(np.float64).reshape(C)
    scale = gamma / np.sqrt(rv + float(bn.eps))
    shape = [1] * w.ndim
    shape[axis] = C
    fused_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
    fused_b = ((b - rm) * scale + beta).astype(bias_dtype)
    return fused_w, fused_b
