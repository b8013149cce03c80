"""Batch normalization for JAX: cbn's kernels as XLA custom calls, under ``jit``, ``grad`` and
``vmap``.

:func:`batch_norm` lowers to two XLA FFI custom calls (``cbn_forward``, ``cbn_backward``)
whose handlers are in cbn's compiled module (cbn/src/cbn_xla.h) and call its C ABI: no
Python runs per call under ``jit``, and no array is copied on the way in or out. The
gradient is a ``jax.custom_vjp`` whose backward is cbn's fused backward; the running
statistics are buffers, not differentiated (as in PyTorch), and come back as new values
(JAX arrays are immutable) instead of being updated in place.

Needs ``jax`` (``pip install "cbn[jax]"``); ``import cbn`` does not import it.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import cbn.jax
>>> x = jax.random.normal(jax.random.key(0), (8, 3, 4, 4))
>>> y, rm, rv = jax.jit(cbn.jax.batch_norm, static_argnames="training")(
...     x, jnp.zeros(3), jnp.ones(3), training=True)
>>> bool(jnp.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5))
True
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _kernels
from ._threads import get_num_threads

__all__ = ["batch_norm"]

_ACTS = {None: 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "silu": 4, "hardswish": 5}


@functools.lru_cache(maxsize=None)
def _register() -> None:
    for name, capsule in _kernels._xla_handlers().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")


def _forward_call(x, w, b, rm, rv, *, training, momentum, eps, axis, act, slope,
                  has_running, nthreads):
    C = x.shape[axis]
    vec = jax.ShapeDtypeStruct((C,), w.dtype)      # the compute dtype (float32 for half x)
    call = jax.ffi.ffi_call("cbn_forward",
                            (jax.ShapeDtypeStruct(x.shape, x.dtype), vec, vec, vec, vec),
                            vmap_method="sequential")
    return call(x, w, b, rm, rv, training=np.int64(training), momentum=np.float64(momentum),
                eps=np.float64(eps), axis=np.int64(axis), act=np.int64(act),
                negative_slope=np.float64(slope), has_running=np.int64(has_running),
                nthreads=np.int64(nthreads))


def _backward_call(g, x, w, b, sm, si, y, *, training, axis, act, slope, nthreads):
    C = x.shape[axis]
    vec = jax.ShapeDtypeStruct((C,), w.dtype)
    call = jax.ffi.ffi_call("cbn_backward", (jax.ShapeDtypeStruct(x.shape, x.dtype), vec, vec),
                            vmap_method="sequential")
    return call(g, x, w, b, sm, si, y, training=np.int64(training), axis=np.int64(axis),
                act=np.int64(act), negative_slope=np.float64(slope),
                nthreads=np.int64(nthreads))


@functools.lru_cache(maxsize=None)
def _op(training: bool, momentum: float, eps: float, axis: int, act: int, slope: float,
        has_running: bool, nthreads: int):
    """The differentiable op for one set of static settings: (x, weight, bias, rm, rv) ->
    (y, new_rm, new_rv); gradients for x, weight and bias, none for the statistics."""
    fwd_kw = dict(training=training, momentum=momentum, eps=eps, axis=axis, act=act,
                  slope=slope, has_running=has_running, nthreads=nthreads)
    bwd_kw = dict(training=training, axis=axis, act=act, slope=slope, nthreads=nthreads)

    @jax.custom_vjp
    def op(x, w, b, rm, rv):
        y, _, _, nrm, nrv = _forward_call(x, w, b, rm, rv, **fwd_kw)
        return y, nrm, nrv

    def op_fwd(x, w, b, rm, rv):
        y, sm, si, nrm, nrv = _forward_call(x, w, b, rm, rv, **fwd_kw)
        return (y, nrm, nrv), (x, w, b, sm, si, y, rm, rv)

    def op_bwd(res, cotangents):
        x, w, b, sm, si, y, rm, rv = res
        g = cotangents[0]
        dx, dw, db = _backward_call(g, x, w, b, sm, si, y, **bwd_kw)
        return dx, dw, db, jnp.zeros_like(rm), jnp.zeros_like(rv)

    op.defvjp(op_fwd, op_bwd)
    return op


def batch_norm(x: Any, running_mean: Optional[Any], running_var: Optional[Any],
               weight: Optional[Any] = None, bias: Optional[Any] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               axis: int = 1, activation: Optional[str] = None,
               negative_slope: float = 0.01) -> Tuple[Any, Optional[Any], Optional[Any]]:
    """Batch normalization of a JAX array, with :func:`cbn.batch_norm`'s arguments.

    Parameters
    ----------
    x : jax.Array, 2D to 5D, float32 or float64, or float16 and bfloat16, which the
        kernels read as they are and compute in float32 (weight, bias and the running
        statistics are then float32), rounding each output once
    running_mean, running_var : jax.Array of C values, or None
        Required in eval. In training, the new values are returned (``(1 - momentum) *
        old + momentum * batch``, unbiased variance); None skips the update.
    weight, bias : jax.Array of C values, or None (ones, zeros)
    training, momentum, eps, axis, activation, negative_slope
        As in :func:`cbn.batch_norm`; static (Python values), not traced.

    Returns
    -------
    (y, new_running_mean, new_running_var)
        The last two are None when the running statistics were None; in eval they are
        the running statistics themselves.

    Raises
    ------
    ValueError
        For settings :func:`cbn.batch_norm` refuses (an unknown activation, eval without
        running statistics, an axis out of range); the kernels' own checks (eps, one
        value per channel in training) raise from the compiled call.
    """
    _register()
    if activation not in _ACTS:
        raise ValueError("activation must be None, 'relu', 'relu6', 'leaky_relu', 'silu' or "
                         f"'hardswish', got {activation!r}")
    x = jnp.asarray(x)
    if not 2 <= x.ndim <= 5:
        raise ValueError(f"expected 2D to 5D input (got {x.ndim}D input)")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for array of dimension {x.ndim}")
    ax = axis % x.ndim
    C = x.shape[ax]
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var must be given when training=False")
    dtype = x.dtype
    compute = dtype if dtype in (jnp.float32, jnp.float64) else jnp.float32
    has_running = running_mean is not None and running_var is not None
    w = jnp.ones(C, compute) if weight is None else jnp.asarray(weight, compute)
    b = jnp.zeros(C, compute) if bias is None else jnp.asarray(bias, compute)
    rm = jnp.asarray(running_mean, compute) if has_running else jnp.zeros(C, compute)
    rv = jnp.asarray(running_var, compute) if has_running else jnp.ones(C, compute)
    op = _op(bool(training), float(momentum), float(eps), ax, _ACTS[activation],
             float(negative_slope), has_running, int(get_num_threads()))
    y, nrm, nrv = op(x, w, b, rm, rv)
    if not has_running:
        return y, None, None
    return y, nrm.astype(jnp.asarray(running_mean).dtype), nrv.astype(
        jnp.asarray(running_var).dtype)
