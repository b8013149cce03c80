"""Plain NumPy batch normalization, computed in float64: a slow twin for every fast function.

This is the oracle the tests compare against and the NumPy baseline the benchmarks time.
Each public function of cbn that does arithmetic on arrays has a twin here with the same
signature and meaning:

==============================================  ==========================================
fast                                            twin
==============================================  ==========================================
``cbn.batch_norm``                              :func:`batch_norm`
``cbn.batch_norm_forward``                      :func:`batch_norm_forward`
``cbn.batch_norm_backward``                     :func:`batch_norm_backward`
``cbn.functional.eval_parameters``              :func:`eval_parameters`
``cbn.functional.normalize``                    :func:`normalize`
``cbn._stages.moments`` / ``merge_moments``     :func:`moments` / :func:`merge_moments`
``cbn._stages.finish``                          :func:`finish`
``cbn._stages.backward_reduce``                 :func:`backward_reduce`
``cbn._stages.backward_elements``               :func:`backward_elements`
``cbn._stages.parameter_grads``                 :func:`parameter_grads`
==============================================  ==========================================

The twins follow the public contract (the same in-place update of running statistics, the
fused activation and residual: ``y = act(bn(x) + residual)``) but are written for clarity:
every quantity is formed in float64 from the definitions, and results are cast once, at the
end, to the dtype the fast function returns (the input's dtype for arrays like the input,
the compute dtype, float32 for half inputs, for per-channel vectors). They do no validation
beyond what NumPy itself does. The activations are PyTorch's (:data:`ACTIVATIONS`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ACTIVATIONS", "activate", "activation_grad", "batch_norm", "batch_norm_forward",
           "batch_norm_backward", "eval_parameters", "normalize", "moments", "merge_moments",
           "finish", "backward_reduce", "backward_elements", "parameter_grads"]

#: the fused activations, with PyTorch's definitions
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu", "hardswish")


def activate(z, activation=None, negative_slope=0.01):
    """``act(z)`` in float64: None (identity), "relu" (max(z, 0)), "relu6" (min(max(z, 0), 6),
    torch's hardtanh(0, 6)), "leaky_relu" (z if z > 0 else negative_slope * z), "silu"
    (z * sigmoid(z)) or "hardswish" (z * min(max(z + 3, 0), 6) / 6)."""
    z = np.asarray(z, dtype=np.float64)
    if activation is None:
        return z
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "relu6":
        return np.minimum(np.maximum(z, 0.0), 6.0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, z * negative_slope)
    if activation == "silu":
        return z * _sigmoid(z)
    if activation == "hardswish":
        return z * np.minimum(np.maximum(z + 3.0, 0.0), 6.0) / 6.0
    raise ValueError(f"unknown activation {activation!r}")


def activation_grad(z, activation=None, negative_slope=0.01):
    """d act / dz at ``z`` in float64, as PyTorch's backward formulas define it at the kinks:
    relu 0 at z <= 0; relu6 1 only for 0 < z < 6; leaky_relu 1 for z > 0, else
    negative_slope; silu s * (1 + z * (1 - s)) with s = sigmoid(z); hardswish 0 below -3,
    z / 3 + 1/2 from -3 to 3 (both included), 1 above."""
    z = np.asarray(z, dtype=np.float64)
    if activation is None:
        return np.ones_like(z)
    if activation == "relu":
        return (z > 0).astype(np.float64)
    if activation == "relu6":
        return ((z > 0) & (z < 6)).astype(np.float64)
    if activation == "leaky_relu":
        return np.where(z > 0, 1.0, negative_slope)
    if activation == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if activation == "hardswish":
        return np.where(z < -3.0, 0.0, np.where(z <= 3.0, z / 3.0 + 0.5, 1.0))
    raise ValueError(f"unknown activation {activation!r}")


def _sigmoid(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------ helpers


def _moved(a, axis):
    """float64 copy of ``a`` with the channel axis moved to the end."""
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)


def _back(a, axis, dtype):
    """``a`` (channel axis last) in the public layout and ``dtype``."""
    return np.moveaxis(a, -1, axis).astype(dtype)


def _reduce_axes(ndim):
    return tuple(range(ndim - 1))


def _compute_dtype(dtype):
    """The dtype per-channel results come back in: float32 for the half types."""
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _vector(a, C, default):
    return np.full(C, default) if a is None else np.asarray(a, dtype=np.float64).reshape(C)


def _invstd(var, eps):
    """1 / sqrt(var + eps), 0 where that is 0."""
    with np.errstate(divide="ignore"):
        denom = np.sqrt(var + eps)
        return np.where(denom == 0.0, 0.0, 1.0 / np.where(denom == 0.0, 1.0, denom))


def _update(running, new, momentum):
    """running = (1 - momentum) * running + momentum * new, in place."""
    if running is not None:
        running[...] = (1.0 - momentum) * running.astype(np.float64) + momentum * new


def _store(y, out):
    if out is None:
        return y
    out[...] = y
    return out


# ------------------------------------------------------------------------ the fused calls


def batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum,
                       eps, *, axis=1, out=None, n_threads=None, activation=None,
                       negative_slope=0.01, residual=None, unbiased=True):
    """Reference forward: returns ``(y, save_mean, save_invstd)`` like ``native_batch_norm``.

    In training, statistics come from the batch (biased variance to normalize), and the
    running statistics, when given, are updated in place with the unbiased variance
    (the biased one with ``unbiased=False``). In eval, the running statistics normalize and
    are returned as the saved ones. ``y = act(bn(x) + residual)``.
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
        _update(running_mean, mean, momentum)
        _update(running_var, var * n / (n - 1) if unbiased else var, momentum)
    else:
        mean = np.asarray(running_mean, dtype=np.float64).reshape(C)
        var = np.asarray(running_var, dtype=np.float64).reshape(C)
    invstd = _invstd(var, eps)
    z = (xm - mean) * invstd * _vector(weight, C, 1.0) + _vector(bias, C, 0.0)
    if residual is not None:
        z = z + _moved(residual, axis)
    y = _back(activate(z, activation, negative_slope), axis, dtype)
    cd = _compute_dtype(dtype)
    return _store(y, out), mean.astype(cd), invstd.astype(cd)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, n_threads=None, activation=None,
               negative_slope=0.01, residual=None, unbiased=True):
    """Reference ``torch.nn.functional.batch_norm``: returns only the output."""
    return batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                              momentum, eps, axis=axis, out=out, activation=activation,
                              negative_slope=negative_slope, residual=residual,
                              unbiased=unbiased)[0]


def _masked(dy, activation, negative_slope, preactivation, output, axis):
    """dz = dy * act'(z), channel axis last. ``preactivation`` (z itself, in the public
    layout) is used where given; else ``output`` (act(z)) where it determines act'(z): relu,
    relu6 and leaky_relu (negative_slope >= 0) are monotone with their kinks at outputs 0
    and 6."""
    if activation is None:
        return dy
    if preactivation is not None:
        return dy * activation_grad(_moved(preactivation, axis), activation, negative_slope)
    if output is None:
        raise ValueError(f"activation={activation!r} needs the forward's output or "
                         "pre-activation")
    y = _moved(output, axis)
    if activation in ("relu", "leaky_relu"):
        # z > 0 exactly where y > 0 (for a non-negative slope)
        return dy * activation_grad(y, activation, negative_slope)
    if activation == "relu6":
        return dy * ((y > 0) & (y < 6))
    raise ValueError(f"activation={activation!r} is not determined by its output: pass "
                     "preactivation=")


def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training=True,
                        *, axis=1, n_threads=None, activation=None, output=None,
                        residual=False, out=None, negative_slope=0.01, preactivation=None):
    """Reference backward: ``(grad_input, grad_weight, grad_bias[, grad_residual])``.

    ``save_mean``/``save_invstd`` are what :func:`batch_norm_forward` returned. In
    training the batch statistics depend on the input, which adds the two mean terms. With
    an activation, dy is first multiplied by act'(z) (``z`` the pre-activation
    ``bn(x) + residual``, or what the forward's ``output`` tells of it); that masked dy is
    the residual's gradient.
    """
    x = np.asarray(input)
    dtype = x.dtype
    axis = axis % x.ndim
    xm = _moved(x, axis)
    C = xm.shape[-1]
    n = xm.size // C if C else 0
    red = _reduce_axes(xm.ndim)
    dz = _masked(_moved(grad_output, axis), activation, negative_slope, preactivation, output,
                 axis)
    mean = np.asarray(save_mean, dtype=np.float64).reshape(C)
    invstd = np.asarray(save_invstd, dtype=np.float64).reshape(C)
    w = _vector(weight, C, 1.0)
    xhat = (xm - mean) * invstd
    grad_bias = dz.sum(axis=red)
    grad_weight = (dz * xhat).sum(axis=red)
    if training and n > 0:
        dx = (dz - grad_bias / n - xhat * grad_weight / n) * invstd * w
    else:
        dx = dz * invstd * w
    cd = _compute_dtype(dtype)
    result = (_store(_back(dx, axis, dtype), out), grad_weight.astype(cd),
              grad_bias.astype(cd))
    return result + ((_back(dz, axis, dtype),) if residual else ())


# ----------------------------------------------------------- eval parameters and normalize


def eval_parameters(weight, bias, running_var, eps, dtype=np.float32):
    """``(invstd, scale, shift)``: 1/sqrt(running_var + eps) (0 where that is 0),
    weight * invstd and bias, in ``dtype``."""
    rv = np.asarray(running_var, dtype=np.float64).reshape(-1)
    C = rv.size
    invstd = _invstd(rv, eps)
    dtype = np.dtype(dtype)
    return (invstd.astype(dtype), (_vector(weight, C, 1.0) * invstd).astype(dtype),
            _vector(bias, C, 0.0).astype(dtype))


def normalize(input, mean, scale, shift, *, axis=1, out=None, n_threads=None, activation=None,
              negative_slope=0.01, residual=None):
    """``y = act((x - mean) * scale + shift + residual)`` per channel."""
    x = np.asarray(input)
    axis = axis % x.ndim
    xm = _moved(x, axis)
    C = xm.shape[-1]
    z = ((xm - _vector(mean, C, 0.0)) * _vector(scale, C, 1.0) + _vector(shift, C, 0.0))
    if residual is not None:
        z = z + _moved(residual, axis)
    return _store(_back(activate(z, activation, negative_slope), axis, x.dtype), out)


# ------------------------------------------------------------------------------- stages


def moments(x, *, axis=1, n_threads=None):
    """``(count, mean, m2)``: values per channel, their mean and sum of squared deviations
    from it, in float64."""
    x = np.asarray(x)
    xm = _moved(x, axis % x.ndim)
    red = _reduce_axes(xm.ndim)
    C = xm.shape[-1]
    count = xm.size // C if C else 0
    if count == 0:
        return 0, np.zeros(C), np.zeros(C)
    mean = xm.mean(axis=red)
    return count, mean, ((xm - mean) ** 2).sum(axis=red)


def merge_moments(parts):
    """The moments of the concatenation of the parts' data, from the definitions: the total
    count, the count-weighted mean, and the within-part plus between-part squared
    deviations (not Chan's update formula, which the fast twin uses)."""
    parts = [(int(c), np.asarray(m, np.float64), np.asarray(s, np.float64))
             for c, m, s in parts]
    parts = [p for p in parts if p[0] > 0] or parts[:1]
    count = sum(c for c, _, _ in parts)
    if count == 0:
        return 0, parts[0][1].copy(), parts[0][2].copy()
    mean = sum(c * m for c, m, _ in parts) / count
    m2 = sum(s + c * (m - mean) ** 2 for c, m, s in parts)
    return count, mean, m2


def finish(mom, eps, *, dtype, weight=None, bias=None, running_mean=None, running_var=None,
           momentum=0.1):
    """``(save_mean, save_invstd, scale, shift)`` in ``dtype`` from merged moments; running
    statistics updated in place with the unbiased variance m2 / (count - 1)."""
    count, mean, m2 = mom
    mean = np.asarray(mean, np.float64)
    C = mean.size
    var = np.asarray(m2, np.float64) / count
    _update(running_mean, mean, momentum)
    _update(running_var, np.asarray(m2, np.float64) / (count - 1), momentum)
    invstd = _invstd(var, eps)
    dtype = np.dtype(dtype)
    return (mean.astype(dtype), invstd.astype(dtype),
            (_vector(weight, C, 1.0) * invstd).astype(dtype),
            _vector(bias, C, 0.0).astype(dtype))


def backward_reduce(grad_output, x, save_mean, *, axis=1, n_threads=None, activation=None,
                    output=None, negative_slope=0.01, preactivation=None):
    """``(sum_dy, sum_dy_xmu)`` per channel in float64, dy masked by the activation's
    derivative."""
    x = np.asarray(x)
    axis = axis % x.ndim
    xm = _moved(x, axis)
    C = xm.shape[-1]
    red = _reduce_axes(xm.ndim)
    dz = _masked(_moved(grad_output, axis), activation, negative_slope, preactivation, output,
                 axis)
    return dz.sum(axis=red), (dz * (xm - _vector(save_mean, C, 0.0))).sum(axis=red)


def backward_elements(grad_output, x, weight, save_mean, save_invstd, sum_dy, sum_dy_xmu,
                      count, *, axis=1, out=None, n_threads=None, activation=None, output=None,
                      negative_slope=0.01, preactivation=None):
    """``dx = (dz - sum_dy/count - (x - mean) * invstd^2 * sum_dy_xmu/count) * weight *
    invstd`` with sums over ``count`` values per channel (of every rank)."""
    x = np.asarray(x)
    axis = axis % x.ndim
    xm = _moved(x, axis)
    C = xm.shape[-1]
    dz = _masked(_moved(grad_output, axis), activation, negative_slope, preactivation, output,
                 axis)
    inv = _vector(save_invstd, C, 1.0)
    xmu = xm - _vector(save_mean, C, 0.0)
    dx = ((dz - np.asarray(sum_dy, np.float64) / count
           - xmu * inv * inv * np.asarray(sum_dy_xmu, np.float64) / count)
          * _vector(weight, C, 1.0) * inv)
    return _store(_back(dx, axis, x.dtype), out)


def parameter_grads(sum_dy, sum_dy_xmu, save_invstd, dtype):
    """``(grad_weight, grad_bias) = (sum_dy_xmu * invstd, sum_dy)`` in ``dtype``."""
    dtype = np.dtype(dtype)
    inv = np.asarray(save_invstd, np.float64)
    return ((np.asarray(sum_dy_xmu, np.float64) * inv).astype(dtype),
            np.asarray(sum_dy, np.float64).astype(dtype))
