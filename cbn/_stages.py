"""The kernels' stages, one at a time, for code that must put something between them.

The fused calls of :mod:`cbn.functional` are compositions of five stages (see
``cbn/_core.pxi``): moments, finish, normalize; backward reduce, backward elements.
SyncBatchNorm puts a collective between moments and finish and between the backward
reduce and the element pass; PreciseBN merges moments over many batches. Composed here in
the fused order with the same arguments, the stages give bit-identical results to
``batch_norm_forward`` and ``batch_norm_backward`` (the tests check it).

Arrays are in the public layout (2D to 5D, channel axis ``axis``); statistics travel as
float64 (C,) arrays. Inputs are validated the way :mod:`cbn.functional` validates them;
these functions are internal, and assume the caller has checked that the per-channel
arrays it passes belong to the input (C values, the compute dtype).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _activations, _arrays, _kernels
from . import functional as _functional
from ._checks import COMPUTE
from ._threads import resolve_num_threads

__all__ = ["Moments", "Stats", "compute_dtype", "moments", "merge_moments", "finish",
           "normalize", "backward_reduce", "backward_elements", "parameter_grads",
           "biased_update"]


class Moments(NamedTuple):
    """Per-channel statistics of ``count`` values per channel."""
    count: int
    mean: np.ndarray   # float64 (C,)
    m2: np.ndarray     # float64 (C,): sum of squared deviations from the mean


class Stats(NamedTuple):
    """What the finish stage hands the output pass (all of the compute dtype)."""
    save_mean: np.ndarray
    save_invstd: np.ndarray
    scale: np.ndarray   # weight * invstd, rounded once from the double invstd
    shift: np.ndarray   # bias


def compute_dtype(dtype) -> np.dtype:
    """float32 for float16/bfloat16/float32 inputs, float64 for float64."""
    return COMPUTE[np.dtype(dtype)]


def _view(x, axis: int, *companions):
    """(x3, view, x) for an input in the public layout: x3 of x's dtype, which the loops
    read (half precision too, converted in registers), unless x is half and one of the
    companion arrays (grad_output, output; None: absent) is not of its dtype: then x3 is
    of the compute dtype (float32), and so must the companions be."""
    x = _arrays.as_input(x, "input")
    ax = _arrays.channel_axis(axis, x.ndim)
    if not _arrays.read_in_place(x, *companions):
        x = x.astype(compute_dtype(x.dtype))
    view = _arrays.View(x, ax)
    return view.read(x), view, x


def moments(x, *, axis: int = 1, n_threads: Optional[int] = None) -> Moments:
    """Per-channel (count, mean, M2) of ``x``, as the training forward computes them."""
    x3, view, _ = _view(x, axis)
    nt = resolve_num_threads(n_threads, x3.size)
    count, mean, m2 = _kernels.moments(x3, nt)
    return Moments(int(count), mean, m2)


def merge_moments(parts: Sequence[Moments]) -> Moments:
    """Chan et al.'s merge of ``parts``, left to right, in float64; empty parts are
    skipped, so [a] and [a, empty, ...] give a's arrays bit for bit."""
    count, mean, m2 = _kernels.merge_moments([tuple(p) for p in parts])
    return Moments(int(count), mean, m2)


def finish(mom: Moments, eps: float, *, dtype, weight=None, bias=None,
           running_mean: Optional[np.ndarray] = None,
           running_var: Optional[np.ndarray] = None, momentum: float = 0.1) -> Stats:
    """save_mean, save_invstd, scale and shift of ``dtype`` (the compute dtype) from
    merged moments, updating the running statistics that are given in place exactly as
    the fused training forward does (unbiased variance M2/(count - 1)). ``momentum`` is
    the factor itself (the caller resolves PyTorch's None, the cumulative average)."""
    dt = np.dtype(dtype)
    C = mom.mean.shape[0]
    w = _arrays.per_channel(weight, "weight", C, dt)
    b = _arrays.per_channel(bias, "bias", C, dt)
    out = [np.empty(C, dt) for _ in range(4)]
    _kernels.finish(int(mom.count), mom.mean, mom.m2, float(eps), w, b, running_mean,
                    running_var, float(momentum), *out)
    return Stats(*out)


def normalize(x, stats: Stats, *, axis: int = 1, out: Optional[np.ndarray] = None,
              n_threads: Optional[int] = None, activation: Optional[str] = None,
              residual=None, negative_slope: float = 0.01) -> np.ndarray:
    """The output pass: ``act((x - save_mean) * scale + shift + residual)``."""
    return _functional.normalize(x, stats.save_mean, stats.scale, stats.shift, axis=axis,
                                 out=out, n_threads=n_threads, activation=activation,
                                 residual=residual, negative_slope=negative_slope)


def _backward_views(grad_output, x, axis: int, activation, output):
    """(x3, view, g3, ym3, kind): the (M, C, K) views of a backward's input, upstream
    gradient and (for relu, relu6, leaky_relu) the forward's output, in the compute dtype,
    and the activation's code. The stages read the derivative off the output only (silu
    and hardswish, which recompute the pre-activation, are fused calls only)."""
    x3, view, xc = _view(x, axis, grad_output, output)
    dt = x3.dtype                       # the arrays' dtype (vectors: compute_dtype(dt))
    g3 = view.read(_arrays.same_shape(grad_output, "grad_output", xc, dt))
    ym3 = None
    kind = _activations.activation_kind(activation)
    if kind and not _activations.from_output(kind):
        raise ValueError(f"the stages' backward takes activation None, 'relu', 'relu6' or "
                         f"'leaky_relu', got {activation!r}")
    if kind:
        if output is None:
            raise ValueError(f"activation={activation!r} needs output (the forward's output)")
        ym3 = view.read(_arrays.same_shape(output, "output", xc, dt))
    return x3, view, g3, ym3, kind


def backward_reduce(grad_output, x, save_mean, *, axis: int = 1,
                    n_threads: Optional[int] = None, activation: Optional[str] = None,
                    output=None, negative_slope: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """(sum_dy, sum_dy_xmu): float64 (C,) sums of dy and dy * (x - mean), with dy masked
    by ReLU's backward where ``activation="relu"`` and ``output`` (the forward's output)."""
    x3, view, g3, ym3, kind = _backward_views(grad_output, x, axis, activation, output)
    mean = _arrays.per_channel(save_mean, "save_mean", view.C, compute_dtype(x3.dtype))
    nt = resolve_num_threads(n_threads, x3.size)
    return _kernels.backward_reduce(g3, x3, mean, nt, ym3, kind,
                                    _activations.check_negative_slope(negative_slope))


def backward_elements(grad_output, x, weight, save_mean, save_invstd, sum_dy, sum_dy_xmu,
                      count: int, *, axis: int = 1, out: Optional[np.ndarray] = None,
                      n_threads: Optional[int] = None, activation: Optional[str] = None,
                      output=None, negative_slope: float = 0.01) -> np.ndarray:
    """The training backward's element pass with (global) sums over ``count`` values per
    channel: ``dx = (dy - sum_dy/count - (x - mean) * invstd^2 * sum_dy_xmu/count) *
    weight * invstd``."""
    x_in = x if isinstance(x, np.ndarray) else np.asarray(x)
    x3, view, g3, ym3, kind = _backward_views(grad_output, x_in, axis, activation, output)
    dt = compute_dtype(x3.dtype)
    C = view.C
    w = _arrays.per_channel(weight, "weight", C, dt)
    mean = _arrays.per_channel(save_mean, "save_mean", C, dt)
    inv = _arrays.per_channel(save_invstd, "save_invstd", C, dt)
    dx, dx3 = view.new(x3.dtype)
    nt = resolve_num_threads(n_threads, x3.size)
    _kernels.backward_elements(g3, x3, w, mean, inv, sum_dy, sum_dy_xmu, int(count), dx3,
                               nt, ym3, kind,
                               _activations.check_negative_slope(negative_slope))
    if dx.dtype != x_in.dtype:
        dx = dx.astype(x_in.dtype)
    if out is not None:
        np.copyto(out, dx)
        return out
    return dx


def parameter_grads(sum_dy, sum_dy_xmu, save_invstd, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """(grad_weight, grad_bias) from the backward sums, rounded as the fused backward
    rounds them: grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy."""
    dt = np.dtype(dtype)
    inv = np.asarray(save_invstd, dtype=dt).astype(np.float64)
    return ((np.asarray(sum_dy_xmu, np.float64) * inv).astype(dt),
            np.asarray(sum_dy, np.float64).astype(dt))


def biased_update(running_var: np.ndarray, m_var_unbiased: np.ndarray, momentum: float,
                   n: int) -> None:
    """``running_var = (1 - momentum) * running_var + momentum * var`` with the biased batch
    variance, in place. ``m_var_unbiased`` is what the kernel's unbiased update wrote into a
    vector of zeros, ``momentum * var * n / (n - 1)`` in the storage dtype; the update is done
    as the kernel does its own: in float64, new term first, rounded once to the storage
    dtype, with ``momentum * var = m_var_unbiased * ((n - 1) / n)``."""
    if n < 2:
        return                  # empty input: the kernel updated nothing (n == 1 raised)
    new = m_var_unbiased.astype(np.float64) * ((n - 1) / n)
    running_var[...] = new + (1.0 - momentum) * running_var.astype(np.float64)
