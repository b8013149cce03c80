"""The functional API: validation, the canonical (M, C, K) view, dispatch to the kernels.

Every public function here validates all of its arguments before anything is written, so a
bad call leaves running statistics and ``out`` untouched. The kernels in :mod:`cbn._kernels`
never validate; this module never loops over data.

A plain call (C-contiguous float32/float64 ndarrays in native byte order, per-channel
vectors that are contiguous (C,) arrays of the input's dtype; ``out`` likewise) goes to
``_kernels.plain_forward``, ``plain_backward`` or ``plain_affine``, which recognise it in
C and cut the per-call overhead on small inputs from about 5 us to 1-2 us; they decline
anything else, and the general path below then validates it.

The canonical view: whatever its ndim and channel axis, an input is walked in memory order,
outermost axis first. The axes before the channel axis (in that order) multiply into M, the
axes after it into K, so the data is a C-contiguous (M, C, K) array: NCHW is (N, C, H*W),
channels-last (NHWC, or NCHW in PyTorch's channels_last format) is (N*H*W, C, 1). Inputs
whose memory order is not a plain permutation of a contiguous block (sliced, negative or
broadcast strides) are copied once; outputs are allocated in the input's memory order.

Arrays of other libraries (torch, JAX, anything with ``__dlpack__``) are read through NumPy
views of their memory (:func:`cbn._arrays.to_numpy`); the call is then made again on the
views (taking the plain path when it can) and its results take the input's type
(:func:`cbn._arrays.result_type`). ``out=`` is one array for the first output or a tuple
with one entry per returned value; the entries given are returned.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _arrays
from . import _kernels
from . import _threads
from ._checks import COMPUTE as _COMPUTE
from ._checks import check_float_dtype as _check_float_dtype
from ._checks import check_eps as _check_eps
from ._checks import check_momentum as _check_momentum
from ._checks import is_half as _is_half
from ._arrays import View as _View
from ._arrays import as_input as _as_input
from ._arrays import channel_axis as _channel_axis
from ._arrays import contiguous as _contiguous
from ._arrays import per_channel as _param
from ._arrays import same_shape as _same_shape
from ._threads import resolve_num_threads
from ._activations import KINDS as _ACT_KINDS
from ._activations import activation_kind as _activation_kind
from ._activations import check_negative_slope as _check_negative_slope
from ._activations import from_output as _from_output

#: what the public functions return: a NumPy array, or an array of the input's library
#: (a torch tensor, a JAX array, ...), which a static type cannot name
_Result = Union[np.ndarray, Any]
_ndarray = np.ndarray                          # one global lookup on the plain path

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward", "eval_parameters",
           "normalize"]

# --------------------------------------------------------------------------- validation


def _running(a, name: str, C: int, dtype, update: bool) -> Optional[np.ndarray]:
    """A running statistic. Updated in place in training, so it must then be a writable
    ndarray of the input's compute dtype (or, for float32, float16/bfloat16: updated in
    float32 and rounded back, as PyTorch does); in eval it is only read and may be any
    array-like."""
    if a is None:
        return None
    if not update:
        return _param(a, name, C, dtype)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} is updated in place, so it must be a numpy.ndarray of "
                        f"dtype {dtype}, got {type(a).__name__}")
    if a.dtype != dtype and not (_is_half(a.dtype) and _COMPUTE[a.dtype] == dtype):
        raise TypeError(f"{name} is updated in place, so its dtype must match the "
                        f"input's ({dtype}), got {a.dtype}")
    if a.size != C:
        raise ValueError(f"{name} should contain {C} elements not {a.size}")
    if not a.flags.writeable:
        raise TypeError(f"{name} is updated in place, so it must be writable")
    return a


def _check_out(out, x: np.ndarray, name: str = "out") -> Optional[np.ndarray]:
    """An output like the input (``out``, ``out[0]``, ``out[3]``): an ndarray of its
    shape and dtype, writable."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or an array with __dlpack__, "
                        f"got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} has shape {out.shape}, expected the input's shape {x.shape}")
    if out.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {out.dtype}, expected the input's dtype {x.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return out


def _check_vector_out(out, name: str, C: int, dtype) -> Optional[np.ndarray]:
    """An entry of ``out`` for a per-channel result (save_mean, grad_weight, ...): an
    ndarray of shape (C,) and the compute dtype, writable."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or an array with __dlpack__, "
                        f"got {type(out).__name__}")
    if out.shape != (C,):
        raise ValueError(f"{name} has shape {out.shape}, expected ({C},)")
    if out.dtype != dtype:
        raise ValueError(f"{name} has dtype {out.dtype}, expected {np.dtype(dtype)}")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return out


def _deliver(results, outs) -> tuple:
    """The results, each copied into its entry of ``out`` where one was given (the entry
    is then returned). Entries the kernel wrote directly are returned as they are."""
    return tuple(r if o is None or o is r else _finish(r, o) for r, o in zip(results, outs))


def _check_unbiased(unbiased) -> bool:
    if unbiased is True or unbiased is False:
        return unbiased
    if isinstance(unbiased, np.bool_):
        return bool(unbiased)
    raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")


def _biased_update(running_var: np.ndarray, m_var_unbiased: np.ndarray, momentum: float,
                   n: int) -> None:
    """``running_var = (1 - momentum) * running_var + momentum * var`` with the biased
    batch variance, in place, from ``m_var_unbiased``: what the kernel's (unbiased) update
    wrote into a vector of zeros, ``momentum * var * n / (n - 1)``. Computed in float64,
    rounded once to ``running_var``'s dtype, as ``cbn._stages.biased_update`` does for the
    modules."""
    new = m_var_unbiased.astype(np.float64) * ((n - 1) / n)
    old = running_var.reshape(-1).astype(np.float64)
    running_var[...] = (new + (1.0 - momentum) * old).reshape(running_var.shape)


# ------------------------------------------------------------- arrays of other libraries
#
# A call with an array of another library (torch, JAX, anything with __dlpack__) reads it
# through a NumPy view of its memory (cbn._arrays.to_numpy: no copy), makes the same call
# on the views (which then takes the plain path when it can) and gives the results the
# input's type (cbn._arrays.result_type); entries of ``out`` are returned as given.


def _any_foreign(*arrays) -> bool:
    for a in arrays:
        if type(a) is tuple:
            if any(map(_arrays.foreign, a)):
                return True
        elif _arrays.foreign(a):
            return True
    return False


def _numpy_out(out, n: int):
    """``out`` with its entries as NumPy views (written in place), and the entries as
    given (returned as the results)."""
    if out is None:
        return None, (None,) * n
    given = _arrays.split_out(out, n)
    names = _arrays.out_names(out, n)
    views = [_arrays.to_numpy(o, names[i], writable=True) for i, o in enumerate(given)]
    return (tuple(views) if type(out) is tuple else views[0]), given


def _typed(results, given, wrap) -> tuple:
    """Results in the caller's types: an entry of ``out`` as given, else wrapped."""
    if len(results) == 1:                       # batch_norm, normalize: the common case
        g = given[0]
        return (results[0] if wrap is None else wrap(results[0])) if g is None else g,
    if wrap is None:
        return tuple(r if g is None else g for r, g in zip(results, given))
    return tuple(wrap(r) if g is None else g for r, g in zip(results, given))


def _foreign_forward(input, weight, bias, running_mean, running_var, training, momentum,
                     eps, axis, out, n_threads, activation, residual, unbiased, nout: int,
                     negative_slope=0.01):
    """batch_norm_forward (nout 3) or batch_norm (nout 1) on foreign arrays."""
    x, wrap = _arrays.read_input(input)
    conv = _arrays.to_numpy
    update = bool(training)
    if out is None:
        out_np = given = None
    elif nout == 1:
        out_np, given = _numpy_out(out, 1)
        if type(out_np) is tuple:
            out_np += (None, None)
    else:
        out_np, given = _numpy_out(out, 3)
    # (None and NumPy arrays are passed on without a call: this path is timed in us)
    res = batch_norm_forward(
        x,
        weight if weight is None or type(weight) is _ndarray else conv(weight, "weight"),
        bias if bias is None or type(bias) is _ndarray else conv(bias, "bias"),
        running_mean if running_mean is None or type(running_mean) is _ndarray
        else conv(running_mean, "running_mean", update),
        running_var if running_var is None or type(running_var) is _ndarray
        else conv(running_var, "running_var", update),
        training, momentum, eps, axis=axis, out=out_np, n_threads=n_threads,
        activation=activation,
        residual=residual if residual is None else conv(residual, "residual"),
        unbiased=unbiased, negative_slope=negative_slope)
    if given is None:                             # the common case, kept short
        if wrap is None:
            return res[:nout]
        return (wrap(res[0]),) if nout == 1 else (wrap(res[0]), wrap(res[1]), wrap(res[2]))
    return _typed(res[:nout], given, wrap)


def _foreign_backward(grad_output, input, weight, save_mean, save_invstd, training, axis,
                      n_threads, activation, output, residual, out, negative_slope=0.01,
                      bias=None):
    """batch_norm_backward on foreign arrays: results in the type of ``input``."""
    x, wrap = _arrays.read_input(input)
    conv = _arrays.to_numpy
    flag = residual is True or residual is False
    out_np, given = _numpy_out(out, 4 if (not flag and residual is not None) or residual is True
                               else 3)
    res = batch_norm_backward(
        conv(grad_output, "grad_output"), x,
        weight if weight is None or type(weight) is _ndarray else conv(weight, "weight"),
        conv(save_mean, "save_mean"), conv(save_invstd, "save_invstd"), training,
        axis=axis, n_threads=n_threads, activation=activation,
        output=output if output is None else conv(output, "output"),
        residual=residual if flag or residual is None else conv(residual, "residual"),
        out=out_np, negative_slope=negative_slope,
        bias=bias if bias is None or type(bias) is _ndarray else conv(bias, "bias"))
    if wrap is None and out is None:
        return res
    return _typed(res, given, wrap)


def _output(view: _View, x: np.ndarray, x3: np.ndarray, out: Optional[np.ndarray]):
    """Choose where the kernel writes: ``out`` itself when its layout allows (including
    ``out is input``), else a new array. Returns (result, its 3D view, out to copy into)."""
    if out is not None:
        o3 = view.direct(out)
        if o3 is not None and (not np.may_share_memory(out, x3) or
                               (o3.ctypes.data == x3.ctypes.data and o3.strides == x3.strides)):
            return out, o3, None
    y, y3 = view.new(x.dtype)
    return y, y3, out


def _finish(y, copy_into):
    if copy_into is None:
        return y
    np.copyto(copy_into, y)
    return copy_into


def _companion(a, name: str, x: np.ndarray, dtype) -> np.ndarray:
    """An array that accompanies the input (residual, output): of x's dtype where x is
    half and it is too (read as it is), else of the compute dtype."""
    if _is_half(x.dtype) and _arrays.read_in_place(x, a):
        return _same_shape(a, name, x, x.dtype)
    return _same_shape(a, name, x, dtype)


def _prepare(x: np.ndarray, axis: int, r: Optional[np.ndarray], out: Optional[np.ndarray]):
    """The kernel's views for one forward: ``(x3, r3, y3, finish)``, where ``finish()``
    returns the result (``out`` when given). Half-precision inputs are read in their own
    dtype (see _arrays.read_in_place), else computed in float32 and the result stored
    back in their dtype: the same values either way."""
    half = not _arrays.read_in_place(x, r)
    x_in, out_in = x, out
    if half:
        x, out = x.astype(np.float32), None
    view = _View(x, axis)
    x3 = view.read(x)
    r3 = None if r is None else view.read(r)
    y, y3, copy_into = _output(view, x, x3, out)

    def finish():
        res = _finish(y, copy_into)
        return _finish(res.astype(x_in.dtype), out_in) if half else res

    return x3, r3, y3, finish


def _plain_kind(activation) -> Optional[int]:
    """The activation's code if it is a known name or None, else None (no plain call)."""
    if activation is None:
        return 0
    return _ACT_KINDS.get(activation) if type(activation) is str else None


# ---------------------------------------------------------------------------- public API


def batch_norm_forward(input: ArrayLike, weight: Optional[ArrayLike], bias: Optional[ArrayLike],
                       running_mean: Optional[np.ndarray], running_var: Optional[np.ndarray],
                       training: bool, momentum: float, eps: float, *, axis: int = 1,
                       out: Union[None, Any, Tuple[Any, ...]] = None,
                       n_threads: Optional[int] = None,
                       activation: Optional[str] = None,
                       residual: Optional[ArrayLike] = None, unbiased: bool = True,
                       negative_slope: float = 0.01,
                       ) -> Tuple[_Result, _Result, _Result]:
    """Batch normalization returning what the backward needs, like ATen's ``native_batch_norm``.

    Parameters
    ----------
    input : array, 2D to 5D, float16, bfloat16, float32 or float64
        ``(N, C, *)`` with ``axis=1``, ``(N, *, C)`` with ``axis=-1``. Half-precision
        inputs (float16; bfloat16 from ml_dtypes) are computed in float32, as PyTorch does
        on the CPU: their statistics and parameters are float32, the output is half. A
        NumPy array, or a CPU array of another library (torch, JAX, anything with
        ``__dlpack__``; torch bfloat16 through ml_dtypes), read without a copy; the results
        take its type (see :func:`batch_norm`).
    weight, bias : array-like of C values or None
        Affine parameters (gamma, beta); None means 1 and 0.
    running_mean, running_var : arrays of C values or None
        In training they are updated in place (when given):
        ``rm = (1 - momentum) * rm + momentum * mean`` and
        ``rv = (1 - momentum) * rv + momentum * var * n / (n - 1)``, n = values per channel.
        In eval they normalize the input and are required.
    training : bool
        Use batch statistics (True) or the running ones (False).
    momentum : float
        Weight of the new batch in the running-statistics update.
    eps : float
        Added to the variance; 0 is allowed (a constant channel then gets invstd 0).
    axis : int, keyword-only
        The channel axis.
    out : array or tuple of 3 arrays or None, keyword-only
        Where to write the output (may be ``input`` itself); or, as NumPy's multi-output
        ufuncs take it, one array or None per returned value: ``(y, save_mean,
        save_invstd)``, the last two of shape (C,) and the compute dtype. The entries
        given are returned.
    n_threads : int, keyword-only
        Threads for this call (default: :func:`cbn.get_num_threads`); counts above
        ``cbn._threads.MAX_THREADS`` are clipped to it, and a process forked after a
        parallel call runs on one thread (see :mod:`cbn._threads`).
    activation : None, "relu", "relu6", "leaky_relu", "silu" or "hardswish", keyword-only
        Applied to the output in the same pass: ``y = act(bn(x) + residual)``, torch's
        definitions (see :mod:`cbn._activations`).
    residual : array like ``input``, keyword-only
        Added to the normalized output before the activation, in the same pass.
    unbiased : bool, keyword-only
        The running-variance convention (default True, PyTorch's); False updates it with
        the biased variance, ``rv = (1 - momentum) * rv + momentum * var`` (Keras', ONNX's).
    negative_slope : float, keyword-only
        leaky_relu's slope below 0 (default 0.01, as torch).

    Training statistics that overflow or underflow in the kernels (float64 values near
    1e200, float32 near 1e20, a variance below the range with ``eps=0``) are recomputed
    with scaling, so finite inputs give finite outputs wherever they are representable
    (except in place, ``out=input``, where the input is gone by then); inf and NaN
    propagate as IEEE arithmetic on the exact formula does (mean +inf for a channel
    holding +inf).

    Returns
    -------
    y : array like ``input``
        Of the input's array type, as the two others (entries of ``out`` as given).
    save_mean : (C,) array
        Batch mean in training, the running mean in eval.
    save_invstd : (C,) array
        ``1 / sqrt(var + eps)`` of the batch (biased var) in training, of the running var
        in eval; 0 where ``var + eps == 0``.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm`; nothing is written when an error is raised.

    See Also
    --------
    batch_norm : The same forward, returning ``y`` only; its Notes give the formulas.
    batch_norm_backward : Takes ``save_mean`` and ``save_invstd`` from here.

    Examples
    --------
    >>> import numpy as np
    >>> import cbn
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (16, 4)).astype(np.float32)
    >>> running_mean, running_var = np.zeros(4, np.float32), np.ones(4, np.float32)
    >>> y, save_mean, save_invstd = cbn.batch_norm_forward(
    ...     x, None, None, running_mean, running_var, True, 0.1, 1e-5)
    >>> np.allclose(save_mean, x.mean(axis=0))
    True
    >>> np.allclose(save_invstd, 1 / np.sqrt(x.var(axis=0) + 1e-5))
    True
    >>> np.allclose(y, (x - save_mean) * save_invstd, atol=1e-6)
    True
    """
    kind = 0 if activation is None else _plain_kind(activation)
    if (kind is not None and unbiased is True and type(momentum) is float
            and momentum - momentum == 0.0 and type(negative_slope) is float
            and negative_slope - negative_slope == 0.0):
        # The plain call (see _kernels.plain_forward) skips the general path below. A
        # momentum that is not a finite float goes there too, to be refused. Both end in
        # the same kernel entry, and both apply the edge rescue there (cbn/_rescue.py).
        r = _kernels.plain_forward(input, weight, bias, running_mean, running_var, training,
                                   momentum, eps, axis, n_threads,
                                   _threads.MIN_PARALLEL_SIZE, residual, kind, out,
                                   negative_slope)
        if r is not None:
            return r
    if _any_foreign(input, weight, bias, running_mean, running_var, residual, out):
        return _foreign_forward(input, weight, bias, running_mean, running_var, training,
                                momentum, eps, axis, out, n_threads, activation, residual,
                                unbiased, 3)
    outs = _arrays.split_out(out, 3)
    names = _arrays.out_names(out, 3)
    x = _as_input(input, "input")
    axis = _channel_axis(axis, x.ndim)
    C = x.shape[axis]
    training = bool(training)
    eps = _check_eps(eps)
    momentum = _check_momentum(momentum)
    kind = _activation_kind(activation)
    slope = _check_negative_slope(negative_slope)
    unbiased = _check_unbiased(unbiased)
    dtype = _COMPUTE[x.dtype]
    w = _param(weight, "weight", C, dtype)
    b = _param(bias, "bias", C, dtype)
    rm = _running(running_mean, "running_mean", C, dtype, update=training)
    rv = _running(running_var, "running_var", C, dtype, update=training)
    r = None if residual is None else _companion(residual, "residual", x, dtype)
    out = _check_out(outs[0], x, names[0])
    outs[1] = _check_vector_out(outs[1], names[1], C, dtype)
    outs[2] = _check_vector_out(outs[2], names[2], C, dtype)
    if training:
        if x.size == C and math.prod(x.shape[:axis] + x.shape[axis + 1:]) == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {x.shape}")
    elif rm is None or rv is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    nt = resolve_num_threads(n_threads, x.size)
    biased_rv = None
    if training and not unbiased and rv is not None:
        # the kernel's unbiased update goes to a vector of zeros (see _biased_update)
        biased_rv, rv = rv, np.zeros(C, dtype=dtype)

    save_mean = np.empty(C, dtype=dtype)
    save_invstd = np.empty(C, dtype=dtype)
    if x.size == 0:
        y = np.empty_like(x) if out is None else out
        if training:
            save_mean.fill(np.nan)
            save_invstd.fill(np.nan)
        else:
            save_mean[:] = rm
            _kernels.invstd(rv, eps, save_invstd)
        return _deliver((y, save_mean, save_invstd), outs)

    x3, r3, y3, finish = _prepare(x, axis, r, out)
    if training:
        # Running stats of any shape and strides (C values, read in C order like the other
        # per-channel vectors), half-precision ones too (updated through the compute
        # dtype): the kernel updates contiguous (C,) copies, written back below.
        rm_k = None if rm is None else _contiguous(rm, dtype).reshape(C)
        rv_k = None if rv is None else _contiguous(rv, dtype).reshape(C)
        _kernels.forward_train(x3, y3, w, b, rm_k, rv_k, save_mean, save_invstd,
                               momentum, eps, nt, r3, kind, slope)
        if rm is not None and not np.shares_memory(rm, rm_k):
            rm[...] = rm_k.reshape(rm.shape)
        if rv is not None and not np.shares_memory(rv, rv_k):
            rv[...] = rv_k.reshape(rv.shape)
    else:
        _kernels.forward_eval(x3, y3, w, b, rm, rv, save_mean, save_invstd, eps, nt, r3,
                              kind, slope)
    if biased_rv is not None:
        _biased_update(biased_rv, rv, momentum, x.size // C)
    return _deliver((finish(), save_mean, save_invstd), outs)


def _affine(x: np.ndarray, axis: int, mean, scale, shift, r, kind: int, slope: float, out,
            nt: int):
    """y = act((x - mean) * scale + shift + r), per channel, in one pass (arguments
    validated; vectors contiguous in the compute dtype; half inputs computed in float32)."""
    x3, r3, y3, finish = _prepare(x, axis, r, out)
    _kernels.affine(x3, y3, mean, scale, shift, r3, kind, nt, slope)
    return finish()


def eval_parameters(weight: Optional[ArrayLike], bias: Optional[ArrayLike],
                    running_var: ArrayLike, eps: float, dtype: DTypeLike = np.float32,
                    ) -> Tuple[_Result, _Result, _Result]:
    """Per-channel vectors of the eval forward: ``(invstd, scale, shift)`` with
    ``invstd = 1/sqrt(running_var + eps)`` (0 where that is 0), ``scale = weight * invstd``
    and ``shift = bias``, in ``dtype`` (float32 or float64: the compute dtype of the
    inputs they will normalize, float32 for half ones), computed exactly as the eval
    forward does.

    See Also
    --------
    normalize : Applies them.

    Examples
    --------
    >>> import numpy as np
    >>> from cbn.functional import eval_parameters
    >>> invstd, scale, shift = eval_parameters([2.0, 1.0], [0.5, 0.0], [4.0, 0.25], 0.0)
    >>> print(invstd, scale, shift)
    [0.5 2. ] [1. 2.] [0.5 0. ]
    >>> scale.dtype
    dtype('float32')
    """
    if _any_foreign(weight, bias, running_var):
        wrap = _arrays.result_type(running_var)
        conv = _arrays.to_numpy
        res = eval_parameters(conv(weight, "weight"), conv(bias, "bias"),
                              conv(running_var, "running_var"), eps, dtype)
        return res if wrap is None else tuple(map(wrap, res))
    dtype = _check_float_dtype(dtype)
    rv = _param(running_var, "running_var", np.size(running_var), dtype)
    C = rv.size
    w = _param(weight, "weight", C, dtype)
    b = _param(bias, "bias", C, dtype)
    eps = _check_eps(eps)
    invstd, scale, shift = (np.empty(C, dtype=dtype) for _ in range(3))
    _kernels.eval_params(w, b, rv, eps, invstd, scale, shift)
    return invstd, scale, shift


def normalize(input: ArrayLike, mean: ArrayLike, scale: ArrayLike, shift: ArrayLike, *,
              axis: int = 1, out: Union[None, Any, Tuple[Any]] = None,
              n_threads: Optional[int] = None, activation: Optional[str] = None,
              residual: Optional[ArrayLike] = None,
              negative_slope: float = 0.01) -> _Result:
    """``y = act((x - mean) * scale + shift + residual)`` per channel, in one pass.

    The eval forward once its per-channel vectors are known (``scale = weight * invstd``,
    ``shift = bias``): what a frozen module calls, with no arithmetic on C-sized vectors
    per call. Keeping ``x - mean`` (rather than ``x * scale + (shift - mean * scale)``)
    gives exactly ``shift`` on a constant channel at its mean.

    Parameters
    ----------
    input : array_like, 2D to 5D, floating point
        As in :func:`batch_norm`.
    mean, scale, shift : array_like of C values
        Per-channel vectors (see :func:`eval_parameters`).
    axis, out, n_threads, activation, residual, negative_slope : keyword-only
        As in :func:`batch_norm`.

    Returns
    -------
    y : array
        Same shape and dtype as ``input``, of its array type (``out`` when given).

    Examples
    --------
    >>> import numpy as np
    >>> import cbn
    >>> from cbn.functional import eval_parameters, normalize
    >>> x = np.random.default_rng(0).standard_normal((10, 2, 3)).astype(np.float32)
    >>> rm = np.array([0.1, -0.2], np.float32)
    >>> rv = np.array([1.5, 0.5], np.float32)
    >>> w, b = np.array([2.0, 1.0], np.float32), np.array([0.0, 1.0], np.float32)
    >>> invstd, scale, shift = eval_parameters(w, b, rv, 1e-5)
    >>> y = normalize(x, rm, scale, shift)
    >>> np.array_equal(y, cbn.batch_norm(x, rm, rv, w, b))     # the eval forward, exactly
    True
    """
    kind = 0 if activation is None else _plain_kind(activation)
    if (kind is not None and type(negative_slope) is float
            and negative_slope - negative_slope == 0.0):
        y = _kernels.plain_affine(input, mean, scale, shift, axis, n_threads,
                                  _threads.MIN_PARALLEL_SIZE, residual, kind, out,
                                  negative_slope)
        if y is not None:
            return y
    if _any_foreign(input, mean, scale, shift, residual, out):
        wrap = _arrays.result_type(input)
        conv = _arrays.to_numpy
        out_np, given = _numpy_out(out, 1)
        y = normalize(conv(input, "input"), conv(mean, "mean"), conv(scale, "scale"),
                      conv(shift, "shift"), axis=axis, out=out_np, n_threads=n_threads,
                      activation=activation, residual=conv(residual, "residual"))
        return _typed((y,), given, wrap)[0]
    if type(out) is tuple:
        (out,) = _arrays.split_out(out, 1)
        name = "out[0]"
    else:
        name = "out"
    x = _as_input(input, "input")
    axis = _channel_axis(axis, x.ndim)
    C = x.shape[axis]
    dtype = _COMPUTE[x.dtype]
    kind = _activation_kind(activation)
    slope = _check_negative_slope(negative_slope)
    mean = _param(mean, "mean", C, dtype)
    scale = _param(scale, "scale", C, dtype)
    shift = _param(shift, "shift", C, dtype)
    r = None if residual is None else _companion(residual, "residual", x, dtype)
    out = _check_out(out, x, name)
    if x.size == 0:
        return np.empty_like(x) if out is None else out
    return _affine(x, axis, mean, scale, shift, r, kind, slope, out,
                   resolve_num_threads(n_threads, x.size))


def batch_norm(input: ArrayLike, running_mean: Optional[np.ndarray],
               running_var: Optional[np.ndarray], weight: Optional[ArrayLike] = None,
               bias: Optional[ArrayLike] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1,
               out: Union[None, Any, Tuple[Any]] = None,
               n_threads: Optional[int] = None, activation: Optional[str] = None,
               residual: Optional[ArrayLike] = None, unbiased: bool = True,
               negative_slope: float = 0.01) -> _Result:
    """Batch normalization with the arguments of ``torch.nn.functional.batch_norm``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel, with the batch's
    statistics when ``training`` (updating the running ones in place when given) and the
    running ones otherwise; then ``+ residual`` and the activation if given.

    Parameters
    ----------
    input : array_like, 2D to 5D, float16, bfloat16, float32 or float64
        ``(N, C, *)`` with ``axis=1`` (NCHW), ``(N, *, C)`` with ``axis=-1``
        (channels-last). Any strides. Half-precision inputs (float16; bfloat16 from
        ml_dtypes) are computed in float32, as PyTorch does on the CPU: their statistics and
        parameters are float32, the output is half. A NumPy array, anything NumPy reads
        (the buffer protocol, ``__array__``), or a CPU array of another library (a torch
        tensor, a JAX array, anything with ``__dlpack__``), read through a NumPy view of its
        memory, not a copy; a torch bfloat16 tensor is read as ml_dtypes' bfloat16. The
        result has the input's type: NumPy in, NumPy out; torch in, torch out; JAX in, JAX
        out; another array-API array through its namespace's ``from_dlpack``; an object
        with ``__dlpack__`` only gives NumPy. The other array arguments may be such arrays
        too.
    running_mean, running_var : ndarray of C values, or None
        Running statistics. In training they are updated in place (see Notes), so they must
        then be writable ndarrays of the compute dtype (the input's, float32 for half
        inputs), or None for no update. In eval (``training=False``) they normalize the
        input, are only read, may be any array-like of C values, and are required.
    weight, bias : array_like of C values, or None, optional
        Affine parameters (gamma, beta); None means ones and zeros.
    training : bool, optional
        Normalize with the batch's statistics (True) or the running ones (False, default).
    momentum : float, optional
        Weight of the new batch in the running-statistics update (default 0.1).
    eps : float, optional
        Added to the variance (default 1e-5); 0 is allowed (a constant channel then gets
        ``invstd`` 0, so its output is ``bias``).
    axis : int, optional, keyword-only
        The channel axis (default 1; -1 for channels-last).
    out : array or 1-tuple, optional, keyword-only
        Where to write the output: same shape and dtype as ``input``, writable (a NumPy
        array, or a CPU array of another library, such as a torch tensor; not a JAX array,
        which is immutable); it may be ``input`` itself (normalization in place). A tuple
        ``(out,)`` is taken too, as NumPy's ufuncs do.
    n_threads : int, optional, keyword-only
        Threads for this call (default: :func:`cbn.get_num_threads`). Results are
        bit-identical for any thread count.
    activation : {None, "relu", "relu6", "leaky_relu", "silu", "hardswish"}, optional, keyword-only
        Applied to the output in the same pass, with torch's definitions: relu
        ``max(z, 0)``, relu6 ``min(max(z, 0), 6)``, leaky_relu ``z if z > 0 else
        negative_slope * z``, silu ``z * sigmoid(z)``, hardswish
        ``z * min(max(z + 3, 0), 6) / 6``.
    residual : array_like, optional, keyword-only
        Same shape as ``input``: added to the normalized output before the activation, in
        the same pass (``y = act(bn(x) + residual)``).
    unbiased : bool, optional, keyword-only
        The running-variance convention: True (default, PyTorch's) updates it with the
        unbiased batch variance, False with the biased one (Keras', ONNX's; see Notes).
    negative_slope : float, optional, keyword-only
        leaky_relu's slope below 0 (default 0.01, as torch).

    Returns
    -------
    y : array
        Same shape and dtype as ``input``, in the input's memory order, of the input's
        array type (``out`` when given).

    Raises
    ------
    TypeError
        An argument of the wrong kind: an input that is not a floating-point array of a
        supported dtype, an ``axis``, ``eps`` or ``momentum`` that is not a number, a
        running statistic that is not a writable ndarray of the compute dtype when it is to
        be updated, an ``out`` that is not an ndarray; a torch tensor that requires grad,
        an array on a device other than the CPU, a bfloat16 tensor without ml_dtypes, a
        JAX array to be written (running statistics in training, ``out``).
    ValueError
        A value out of range: an input that is not 2D to 5D, an ``axis`` out of range
        (:class:`numpy.exceptions.AxisError`), a negative or infinite ``eps``, a per-channel
        vector without C values, one value per channel in training, running statistics
        missing in eval, an ``out`` of the wrong shape or dtype or read-only, an unknown
        ``activation``.
        Nothing is written (running statistics, ``out``) when an error is raised.

    See Also
    --------
    batch_norm_forward : Also returns the saved statistics the backward needs.
    batch_norm_backward : The gradients.
    BatchNorm : The module, holding parameters and running statistics.

    Notes
    -----
    With n the number of values per channel (the product of all axes but ``axis``), the
    batch statistics of channel c are ``mean = sum(x) / n`` and the biased
    ``var = sum((x - mean)**2) / n``, which normalize the input. In training, the running
    statistics are then updated in place with the unbiased variance, as PyTorch does::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)

    or, with ``unbiased=False``, ``momentum * var`` for the last term.

    The statistics are reduced in a fixed order (per-block partial results merged in double
    precision), so the result is bit-identical for any number of threads.

    Examples
    --------
    >>> import numpy as np
    >>> import cbn
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (8, 3, 4, 4)).astype(np.float32)
    >>> running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)

    Training: the batch's statistics, running ones updated in place.

    >>> y = cbn.batch_norm(x, running_mean, running_var, training=True, momentum=0.1)
    >>> y.shape, y.dtype
    ((8, 3, 4, 4), dtype('float32'))
    >>> print(np.round(y.mean(axis=(0, 2, 3)), 4) + 0.0, np.round(y.std(axis=(0, 2, 3)), 4))
    [0. 0. 0.] [1. 1. 1.]
    >>> np.allclose(running_mean, 0.1 * x.mean(axis=(0, 2, 3)))
    True
    >>> np.allclose(running_var, 0.9 + 0.1 * x.var(axis=(0, 2, 3), ddof=1))
    True

    Eval (the default): the running statistics, an affine transform, ReLU in the same pass.

    >>> weight, bias = np.array([1.0, 2.0, 0.5], np.float32), np.zeros(3, np.float32)
    >>> y = cbn.batch_norm(x, running_mean, running_var, weight, bias, activation="relu")
    >>> c = (slice(None), None, None)           # a (C,) vector along axis 1
    >>> expected = (x - running_mean[c]) / np.sqrt(running_var[c] + 1e-5) * weight[c]
    >>> np.allclose(y, np.maximum(expected, 0), atol=1e-5)
    True

    Channels-last input (NHWC): the channel axis is the last one.

    >>> x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    >>> y_nhwc = cbn.batch_norm(x_nhwc, running_mean, running_var, weight, bias, axis=-1,
    ...                         activation="relu")
    >>> np.allclose(y_nhwc.transpose(0, 3, 1, 2), y)
    True
    """
    if type(input) is _ndarray and unbiased is True and type(out) is not tuple:
        # the common call, with nothing to convert: the plain call straight into the
        # kernel (as batch_norm_forward would make it)
        kind = 0 if activation is None else _plain_kind(activation)
        if (kind is not None and type(momentum) is float and momentum - momentum == 0.0
                and type(negative_slope) is float
                and negative_slope - negative_slope == 0.0):
            r = _kernels.plain_forward(input, weight, bias, running_mean, running_var,
                                       training, momentum, eps, axis, n_threads,
                                       _threads.MIN_PARALLEL_SIZE, residual, kind, out,
                                       negative_slope)
            if r is not None:
                return r[0]
        return batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                                  momentum, eps, axis=axis, out=out, n_threads=n_threads,
                                  activation=activation, residual=residual,
                                  negative_slope=negative_slope)[0]
    if type(input) is not _ndarray:             # any other input: NumPy or foreign results
        return _foreign_forward(input, weight, bias, running_mean, running_var, training,
                                momentum, eps, axis, out, n_threads, activation, residual,
                                unbiased, 1, negative_slope)[0]
    if type(out) is tuple:                      # one array (or None) per returned value
        (out,) = _arrays.split_out(out, 1)
        if out is not None:
            out = (out, None, None)             # so that errors name it out[0]
    return batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                              momentum, eps, axis=axis, out=out, n_threads=n_threads,
                              activation=activation, residual=residual,
                              unbiased=unbiased, negative_slope=negative_slope)[0]


def batch_norm_backward(grad_output: ArrayLike, input: ArrayLike, weight: Optional[ArrayLike],
                        save_mean: ArrayLike, save_invstd: ArrayLike, training: bool = True,
                        *, axis: int = 1, n_threads: Optional[int] = None,
                        activation: Optional[str] = None, output: Optional[ArrayLike] = None,
                        residual=False,
                        out: Union[None, Any, Tuple[Any, ...]] = None,
                        negative_slope: float = 0.01,
                        bias: Optional[ArrayLike] = None) -> Tuple[_Result, ...]:
    """Gradients of :func:`batch_norm_forward`, like ATen's ``native_batch_norm_backward``.

    ``save_mean`` and ``save_invstd`` are what the forward returned (batch statistics in
    training, running ones in eval). In training the batch statistics depend on the input::

        dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),  xhat = (x - mean) * invstd

    and in eval ``dx = w * invstd * dy``. Returns ``(grad_input, grad_weight, grad_bias)``
    with ``grad_weight = sum(dy * xhat)`` and ``grad_bias = sum(dy)`` per channel (returned
    even when ``weight`` is None, which means a weight of 1).

    For a forward with an activation, pass the same ``activation=`` (and
    ``negative_slope=``): dy is multiplied by the activation's derivative inside the same
    passes, with no extra pass over memory. relu, relu6 and leaky_relu read it off the
    forward's output, passed as ``output=`` (relu: where ``output > 0``; relu6:
    ``0 < output < 6``; leaky_relu: 1 or ``negative_slope`` by the sign of ``output``,
    which needs ``negative_slope >= 0``, as torch's in-place leaky_relu). silu and
    hardswish recompute the pre-activation ``z = (x - mean) * weight * invstd + bias
    (+ residual)`` in the same passes, so they take the forward's ``bias=`` and, if it had
    one, its ``residual=`` array. For a forward with a ``residual``, pass ``residual=True``
    (or the residual itself) to also get the residual's gradient (dy times the
    activation's derivative) as a fourth result:
    ``(grad_input, grad_weight, grad_bias, grad_residual)``.

    ``out=`` receives the input gradient, so that a training step can run without
    allocating it; it may be ``grad_output`` itself (an in-place backward: each value of
    dy is read before its dx is written).

    Parameters
    ----------
    grad_output : array_like
        Gradient of the forward's output: the input's shape, floating point.
    input : array_like
        The forward's input.
    weight : array_like of C values, or None
        The forward's weight (None: ones).
    save_mean, save_invstd : array_like of C values
        What :func:`batch_norm_forward` returned.
    training : bool, optional
        Whether the forward used batch statistics (default True).
    axis, n_threads : int, optional, keyword-only
        As in the forward.
    activation : {None, "relu", "relu6", "leaky_relu", "silu", "hardswish"}, optional, keyword-only
        The forward's activation; relu, relu6 and leaky_relu need ``output``.
    output : array_like, optional, keyword-only
        The forward's output, with relu, relu6 or leaky_relu.
    residual : bool or array_like, optional, keyword-only
        Also return the residual's gradient (True, or the forward's residual, which silu
        and hardswish need to recompute the pre-activation).
    out : array or tuple, optional, keyword-only
        Where to write ``grad_input``: the input's shape and dtype, writable; may be
        ``grad_output`` itself. One that shares memory with the inputs otherwise gets the
        right values too (computed aside and copied in). Or a tuple with one array or None
        per returned value, ``(grad_input, grad_weight, grad_bias[, grad_residual])``;
        the entries given are returned.
    negative_slope : float, optional, keyword-only
        The forward's leaky_relu slope (default 0.01).
    bias : array_like of C values, or None, keyword-only
        The forward's bias, for silu and hardswish (None: zeros).

    Returns
    -------
    grad_input : array
        The input's shape and dtype (``out`` when given). All results have the array
        type of ``input`` (see :func:`batch_norm`).
    grad_weight, grad_bias : ndarray of shape (C,)
        In the compute dtype (float32 for half inputs).
    grad_residual : ndarray
        Only with ``residual=True``: the input's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong kind or shape (as :func:`batch_norm`), missing saved
        statistics, ``activation="relu"`` without ``output`` or ``output`` without it, an
        ``out`` that is not an ndarray or is of the wrong shape or dtype or read-only
        (nothing is written then).

    See Also
    --------
    batch_norm_forward : The forward whose gradients these are.
    BatchNorm.backward : The same for a module, accumulating ``grad_weight``/``grad_bias``.

    Examples
    --------
    >>> import numpy as np
    >>> import cbn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(1.0, 2.0, (32, 3, 5))
    >>> weight = np.array([0.5, 1.0, 2.0])
    >>> y, save_mean, save_invstd = cbn.batch_norm_forward(
    ...     x, weight, None, None, None, True, 0.1, 1e-5)
    >>> grad_y = rng.standard_normal(y.shape)
    >>> grad_x, grad_weight, grad_bias = cbn.batch_norm_backward(
    ...     grad_y, x, weight, save_mean, save_invstd)
    >>> grad_x.shape, grad_weight.shape
    ((32, 3, 5), (3,))
    >>> np.allclose(grad_bias, grad_y.sum(axis=(0, 2)))
    True
    >>> xhat = (x - save_mean[:, None]) * save_invstd[:, None]
    >>> np.allclose(grad_weight, (grad_y * xhat).sum(axis=(0, 2)))
    True

    In training the batch mean absorbs any shift of the input, so each channel's input
    gradient sums to zero:

    >>> np.allclose(grad_x.sum(axis=(0, 2)), 0)
    True
    """
    if residual is False or residual is True:
        # The plain call (see _kernels.plain_backward): activations whose derivative is
        # read off output= (silu and hardswish take the general path).
        if activation is None:
            if output is None:
                r = _kernels.plain_backward(grad_output, input, weight, save_mean,
                                            save_invstd, training, axis, n_threads,
                                            _threads.MIN_PARALLEL_SIZE, None, residual, out)
                if r is not None:
                    return r
        elif output is not None:
            kind = _plain_kind(activation)
            if (kind is not None and _from_output(kind) and type(negative_slope) is float
                    and negative_slope - negative_slope == 0.0
                    and (kind != 3 or negative_slope >= 0.0)):
                r = _kernels.plain_backward(grad_output, input, weight, save_mean,
                                            save_invstd, training, axis, n_threads,
                                            _threads.MIN_PARALLEL_SIZE, output, residual, out,
                                            kind, negative_slope)
                if r is not None:
                    return r
    if _any_foreign(grad_output, input, weight, save_mean, save_invstd, output, out, bias,
                    None if residual is True or residual is False else residual):
        return _foreign_backward(grad_output, input, weight, save_mean, save_invstd, training,
                                 axis, n_threads, activation, output, residual, out,
                                 negative_slope, bias)
    x = _as_input(input, "input")
    dy = grad_output if isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
    if dy.dtype.kind != "f" and not _is_half(dy.dtype):
        raise TypeError(f"grad_output must be a floating-point array, got dtype {dy.dtype}")
    if dy.shape != x.shape:
        raise ValueError(f"grad_output has shape {dy.shape}, expected the input's shape {x.shape}")
    axis = _channel_axis(axis, x.ndim)
    C = x.shape[axis]
    dtype = _COMPUTE[x.dtype]
    half = dtype != x.dtype
    w = _param(weight, "weight", C, dtype)
    mean = _param(save_mean, "save_mean", C, dtype)
    invstd = _param(save_invstd, "save_invstd", C, dtype)
    if mean is None or invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    kind = _activation_kind(activation)
    slope = _check_negative_slope(negative_slope)
    if _from_output(kind):
        if output is None:
            raise ValueError(f"activation={activation!r} needs output=, the forward's output")
        if kind == 3 and slope < 0:
            raise ValueError("negative_slope must be >= 0 for leaky_relu's backward, which "
                             f"reads the derivative off output=; got {slope}")
    elif output is not None:
        raise ValueError("output= is only used with activation='relu', 'relu6' or "
                         f"'leaky_relu', got activation={activation!r}")
    ym = None if output is None else _companion(output, "output", x, dtype)
    if np.ndim(residual) == 0:          # True/False (or any truth value): no array
        res = None
    else:
        res = _companion(residual, "residual", x, dtype)
    b = _param(bias, "bias", C, dtype)
    training = bool(training)
    residual = res is not None or bool(residual)
    nout = 4 if residual else 3
    outs = _arrays.split_out(out, nout)
    names = _arrays.out_names(out, nout)
    out = _check_out(outs[0], x, names[0])
    outs[1] = _check_vector_out(outs[1], names[1], C, dtype)
    outs[2] = _check_vector_out(outs[2], names[2], C, dtype)
    if residual:
        outs[3] = _check_out(outs[3], x, names[3])
    nt = resolve_num_threads(n_threads, x.size)
    stored = dtype                      # the dtype of the arrays the loops read
    if half and _arrays.read_in_place(x, dy, ym, res):
        half = False                    # the loops read the half arrays as they are
        stored = x.dtype
    elif half:
        x = x.astype(np.float32)
        ym = None if ym is None else ym.astype(np.float32)
        res = None if res is None else res.astype(np.float32)
    if dy.dtype != stored:
        dy = dy.astype(stored)

    grad_weight = np.empty(C, dtype=dtype)
    grad_bias = np.empty(C, dtype=dtype)
    if x.size == 0:
        grad_weight.fill(0)
        grad_bias.fill(0)
        empty = np.empty(x.shape, dtype=_input_dtype(input))
        return _deliver((empty if out is None else out, grad_weight, grad_bias)
                        + ((empty.copy(),) if residual else ()), outs)
    view = _View(x, axis)
    x3 = view.read(x)
    dy3 = view.read(dy)
    ym3 = None if ym is None else view.read(ym)
    res3 = None if res is None or _from_output(kind) else view.read(res)
    dx, dx3, copy_into = _grad_output_target(view, out, half, stored, x3, dy3, ym3, res3)
    gr, gr3 = (_grad_residual_target(view, outs[3], half, x3, dy3, ym3, dx3, res3)
               if residual else (None, None))
    _kernels.backward(dy3, x3, dx3, w, mean, invstd, grad_weight, grad_bias, training, nt,
                      ym3, gr3, kind, slope, b, res3)
    if half:
        dx = dx.astype(_input_dtype(input))
        gr = None if gr is None else gr.astype(dx.dtype)
    return _deliver((_finish(dx, copy_into), grad_weight, grad_bias)
                    + ((gr,) if residual else ()), outs)


def _grad_residual_target(view: _View, out: Optional[np.ndarray], half: bool,
                          x3: np.ndarray, dy3: np.ndarray, ym3: Optional[np.ndarray],
                          dx3: np.ndarray, res3: Optional[np.ndarray] = None):
    """Where the backward writes grad_residual: ``out[3]`` itself when its layout allows
    and it shares no memory with the arrays read or with grad_input; else a new array
    (copied into ``out[3]`` at the end)."""
    if out is not None and not half:
        o3 = view.direct(out)
        if o3 is not None and not any(np.may_share_memory(o3, a)
                                      for a in (x3, dy3, ym3, dx3, res3)
                                      if a is not None):
            return out, o3
    return view.new(dy3.dtype)


def _grad_output_target(view: _View, out: Optional[np.ndarray], half: bool, dtype,
                        x3: np.ndarray, dy3: np.ndarray, ym3: Optional[np.ndarray],
                        res3: Optional[np.ndarray] = None):
    """Where the backward writes grad_input: ``out`` itself when its layout allows and it
    is dy's memory (value for value) or shares none with the arrays read; else a new
    array. Returns (result, its 3D view, out to copy into)."""
    if out is not None and not half:
        o3 = view.direct(out)
        if (o3 is not None and not np.may_share_memory(o3, x3)
                and (ym3 is None or not np.may_share_memory(o3, ym3))
                and (res3 is None or not np.may_share_memory(o3, res3))
                and (not np.may_share_memory(o3, dy3)
                     or (o3.ctypes.data == dy3.ctypes.data and o3.strides == dy3.strides))):
            return out, o3, None
    dx, dx3 = view.new(dtype)
    return dx, dx3, out


def _input_dtype(input) -> np.dtype:
    """dtype of an input as the public functions see it."""
    return input.dtype if isinstance(input, np.ndarray) else np.asarray(input).dtype
