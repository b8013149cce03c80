"""cbn's C ABI from Python: ctypes mirrors of the structs of cbn/include/cbn_core.h and the
entries of cbn.h as ctypes functions, for ctypes, cffi and numba callers.

A ctypes call releases the GIL while the entry runs; numba's ``@njit`` code calls the same
ctypes functions (see the README's "Embedding"). Field names and meanings are those of the
C header, which documents each one.

Examples
--------
>>> import ctypes, numpy as np
>>> from cbn import abi
>>> x = np.random.default_rng(0).standard_normal((64, 16, 1))      # (M, C, K)
>>> y, mean, invstd = np.empty_like(x), np.empty(16), np.empty(16)
>>> d = abi.desc(x)
>>> a = abi.ForwardArgs(training=1, momentum=0.1, eps=1e-5, x=x.ctypes.data,
...                     y=y.ctypes.data, save_mean=mean.ctypes.data,
...                     save_invstd=invstd.ctypes.data)
>>> abi.entry("forward")(ctypes.byref(d), ctypes.byref(a)) == abi.OK
True
>>> bool(np.allclose(mean, x.mean(axis=(0, 2))))
True
"""

from __future__ import annotations

import ctypes as ct

import numpy as np

import cbn

i32, i64, f64, vp = ct.c_int32, ct.c_int64, ct.c_double, ct.c_void_p
F32, F64, F16, BF16 = 0, 1, 2, 3
ACTS = {None: 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "silu": 4, "hardswish": 5}
OK, ERR_ARG, ERR_DTYPE, ERR_NOMEM = 0, 1, 2, 3


class Act(ct.Structure):
    _fields_ = [("kind", i32), ("reserved", i32), ("negative_slope", f64)]


class Desc(ct.Structure):
    _fields_ = [("version", i32), ("storage", i32), ("compute", i32), ("nthreads", i32),
                ("M", i64), ("C", i64), ("K", i64),
                ("stride_m", i64), ("stride_c", i64), ("stride_k", i64),
                ("scratch", vp), ("scratch_bytes", i64), ("msg", ct.c_char_p),
                ("msg_size", i64)]


def _args(*names, head=()):
    return list(head) + [(n, vp) for n in names]


class ForwardArgs(ct.Structure):
    _fields_ = _args("x", "residual", "y", "weight", "bias", "running_mean", "running_var",
                     "save_mean", "save_invstd",
                     head=[("training", i32), ("reserved", i32), ("act", Act),
                           ("momentum", f64), ("eps", f64)])


class NormalizeArgs(ct.Structure):
    _fields_ = _args("x", "residual", "y", "mean", "scale", "shift", head=[("act", Act)])


class EvalParamsArgs(ct.Structure):
    _fields_ = _args("weight", "bias", "running_var", "invstd", "scale", "shift",
                     head=[("eps", f64)])


class BackwardArgs(ct.Structure):
    _fields_ = _args("grad_output", "x", "output", "residual", "weight", "bias", "save_mean",
                     "save_invstd", "grad_input", "grad_weight", "grad_bias", "grad_residual",
                     head=[("training", i32), ("reserved", i32), ("act", Act)])


class MomentsArgs(ct.Structure):
    _fields_ = _args("x", "mean", "m2")


class FinishArgs(ct.Structure):
    _fields_ = _args("mean", "m2", "weight", "bias", "running_mean", "running_var",
                     "save_mean", "save_invstd", "scale", "shift",
                     head=[("count", f64), ("momentum", f64), ("eps", f64)])


class ReduceArgs(ct.Structure):
    _fields_ = _args("grad_output", "x", "output", "residual", "mean", "scale", "shift",
                     "sum_dy", "sum_dy_xmu", head=[("act", Act)])


class ElementsArgs(ct.Structure):
    _fields_ = _args("grad_output", "x", "output", "residual", "weight", "bias", "mean",
                     "invstd", "sum_dy", "sum_dy_xmu", "grad_input",
                     head=[("act", Act), ("count", f64)])


ARGS = {"forward": ForwardArgs, "normalize": NormalizeArgs, "eval_params": EvalParamsArgs,
        "backward": BackwardArgs, "moments": MomentsArgs, "finish": FinishArgs,
        "backward_reduce": ReduceArgs, "backward_elements": ElementsArgs}


__all__ = ["Act", "Desc", "ForwardArgs", "NormalizeArgs", "EvalParamsArgs", "BackwardArgs",
           "MomentsArgs", "FinishArgs", "ReduceArgs", "ElementsArgs", "ARGS", "ACTS", "entry",
           "desc", "message", "act", "ptr", "OK", "ERR_ARG", "ERR_DTYPE", "ERR_NOMEM", "F32",
           "F64", "F16", "BF16"]


def entry(name):
    """The C ABI's entry ``name`` (``"forward"``, ``"backward"``, ..., ``"view"``,
    ``"status_name"``: the fields of cbn.h's cbn_api) as a ctypes function, which releases
    the GIL while it runs."""
    addr = cbn.capi()[name]
    # pointers as void*: ctypes takes ctypes.byref(struct) or an address (an int), and
    # numba's nopython mode, which knows no ctypes struct types, can call it
    if name == "view":
        proto = ct.CFUNCTYPE(i32, vp, i32, vp, vp, i32)
    elif name == "status_name":
        proto = ct.CFUNCTYPE(ct.c_char_p, i32)
    elif name in ARGS:
        proto = ct.CFUNCTYPE(i32, vp, vp)
    else:
        raise ValueError(f"no C ABI entry {name!r}")
    return proto(addr)


def ptr(a):
    """The address of an ndarray's data (None for None)."""
    return None if a is None else a.ctypes.data


def desc(x3, nthreads=1, storage=None):
    """A descriptor of the C-contiguous (M, C, K) ndarray ``x3`` (its dtype, or the dtype
    code ``storage``), with a 256-byte message buffer (read it with :func:`message`)."""
    code = {np.dtype(np.float32): F32, np.dtype(np.float64): F64,
            np.dtype(np.float16): F16}.get(x3.dtype, BF16) if storage is None else storage
    M, C, K = x3.shape
    buf = ct.create_string_buffer(256)
    d = Desc(version=1, storage=code, compute=F32 if code in (F16, BF16) else code,
             nthreads=nthreads, M=M, C=C, K=K, stride_m=C * K, stride_c=K, stride_k=1,
             scratch=None, scratch_bytes=0, msg=ct.cast(buf, ct.c_char_p), msg_size=256)
    d._buf = buf           # keep it alive
    return d


def message(d):
    """The message an entry wrote into a descriptor made by :func:`desc`."""
    return d._buf.value.decode()


def act(name=None, slope=0.01):
    """The activation struct for ``name`` (None, "relu", ...) and its negative_slope."""
    return Act(kind=ACTS[name], reserved=0, negative_slope=slope)
