"""Plain NumPy batch normalization, computed in float64.

This is the oracle the tests compare against and the NumPy baseline the benchmarks time.
It follows the public contract of :mod:`cbn.functional` (same signatures, same in-place
update of running statistics) but is written for clarity: every quantity is formed in
float64 from the definitions, results are cast back to the input's dtype at the end.
It does no validation beyond what NumPy itself does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]


def _moved(a, axis):
    """float64 copy of ``a`` with the channel axis moved to the end."""
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)


def _reduce_axes(ndim):
    return tuple(range(ndim - 1))


def batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum,
                       eps, *, axis=1, out=None, n_threads=None):
    """Reference forward: returns ``(y, save_mean, save_invstd)`` like ``native_batch_norm``.

    In training, statistics come from the batch (biased variance to normalize), and the
    running statistics, when given, are updated in place with the unbiased variance.
    In eval, the running statistics normalize and are returned as the saved ones.
    """
    x = np.asarray(input)
    dtype = x.dtype
    axis = axis % x.ndim
    xm = _moved(x, axis)
    C = xm.shape[-1]
    n = xm.size // C if C else 0
    red = _reduce_axes(xm.ndim)
    if training:
        mean = xm.mean(axis=red)
        var = ((xm - mean) ** 2).mean(axis=red)
        if running_mean is not None:
            rm = running_mean.astype(np.float64)
            running_mean[...] = (1.0 - momentum) * rm + momentum * mean
        if running_var is not None:
            rv = running_var.astype(np.float64)
            unbiased = var * n / (n - 1)
            running_var[...] = (1.0 - momentum) * rv + momentum * unbiased
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    with np.errstate(divide="ignore"):
        denom = np.sqrt(var + eps)
        invstd = np.where(denom == 0.0, 0.0, 1.0 / np.where(denom == 0.0, 1.0, denom))
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, dtype=np.float64)
    y = (xm - mean) * invstd * w + b
    y = np.moveaxis(y, -1, axis).astype(dtype)
    if out is not None:
        out[...] = y
        y = out
    return y, mean.astype(dtype), invstd.astype(dtype)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, n_threads=None):
    """Reference ``torch.nn.functional.batch_norm``: returns only the output."""
    return batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                              momentum, eps, axis=axis, out=out)[0]


def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training=True,
                        *, axis=1, n_threads=None):
    """Reference backward: ``(grad_input, grad_weight, grad_bias)``.

    ``save_mean``/``save_invstd`` are what :func:`batch_norm_forward` returned. In
    training the batch statistics depend on the input, which adds the two mean terms.
    """
    x = np.asarray(input)
    dtype = x.dtype
    axis = axis % x.ndim
    xm = _moved(x, axis)
    dy = _moved(grad_output, axis)
    C = xm.shape[-1]
    n = xm.size // C if C else 0
    red = _reduce_axes(xm.ndim)
    mean = np.asarray(save_mean, dtype=np.float64)
    invstd = np.asarray(save_invstd, dtype=np.float64)
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    xhat = (xm - mean) * invstd
    grad_bias = dy.sum(axis=red)
    grad_weight = (dy * xhat).sum(axis=red)
    if training and n > 0:
        dx = (dy - grad_bias / n - xhat * grad_weight / n) * invstd * w
    else:
        dx = dy * invstd * w
    dx = np.moveaxis(dx, -1, axis).astype(dtype)
    return dx, grad_weight.astype(dtype), grad_bias.astype(dtype)
