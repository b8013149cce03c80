"""A saved corpus of cbn's results: every loop shape and path, hashed to the bit.

The kernels are rewritten from time to time (C moved to real files, stages split, entry
paths merged); their results must not change by a single bit. This module enumerates
deterministic cases (shape, channel axis, dtype, kind of data, memory layout), runs each
through cbn's PUBLIC API only (``batch_norm_forward`` training and eval, with and without
weight, bias and running statistics; the fused ReLU and residual; ``out=``, in place too;
``batch_norm_backward`` training and eval, masked by the ReLU, with the residual's
gradient; ``functional.eval_parameters`` and ``functional.normalize``; the modules,
``momentum=None``, ``freeze()``), and records the SHA-256 of every output array.
tests/data/kernel_corpus.json holds the digests computed on the tree they were saved
from; tests/test_corpus.py recomputes every case on 1, 2 and 3 threads and compares.

The cases cover the loop shapes of cbn._kernels (see its module docstring) and those of
tests/test_kernel_paths.py and tests/test_plain_path.py:

* planes (K >= 16): K = 16 exactly (and K = 15, the last rows shape), vector tails
  (K = 17, 31, 33, 196), a plane of exactly one statistics block (4096) and longer ones
  (4097, 4100, 30000: blocks and work items straddling channels and batch entries),
  short planes taken several at a time with a remainder (K = 100, M = 90), more units
  than work items (C = 200), planes of more than one element-wise chunk (16385);
* rows (K < 16): glued rows of 5 to 8 vectors of 64 bytes, glued-row tails of 1 to 7
  vectors, wider than 8 and of no multiple of the vector, no full row at all (M < rows
  glued), rows wider than 8 vectors (memory-order loops, K = 1 and K > 1), widths that
  are no multiple of the vector (column loops), M == 1 (channel axis 0), a middle
  channel axis; 1 to 4 statistics blocks, and (HUGE, 8.4 million values) more blocks
  than work items;
* 2D (N, C), channels-last via ``axis=-1``, 3D, 4D and 5D;
* sizes below and above cbn._threads.MIN_PARALLEL_SIZE (the paths' shapes enlarged as in
  test_kernel_paths.py, 65520 and exactly 65536 values), so 2 and 3 threads run parallel;
* data: per-channel means and spreads (``normal``), a large mean (``offset``, 1000 + x),
  a trend along each channel (``ramp``: the first values' mean is far off, so the
  statistics take their corrected second pass, in every block of rows and every plane
  unit), a trend in channel 0 only (``ramp1``: the rows kernels' second pass for flagged
  channels only), a constant channel with eps = 0 and a NaN (``special``);
* float32 and float64 (HUGE: float32 only), float16 (computed in float32) for a few
  shapes;
* layouts: C-contiguous (the plain-call fast path), and for some shapes Fortran order,
  channels-last memory with ``axis=1``, a strided (non-dense) view, and an ndarray
  subclass with list weights and a NumPy-integer thread count (the general path on the
  same memory).

Inputs come from ``np.random.default_rng(seed)`` with a per-case seed (a CRC of the case
id, so adding a case changes no other). Their digest is saved too: if it differs, NumPy's
generator changed, not cbn, and the corpus must be regenerated from a trusted tree.

Digests are of the dtype, the shape and the values in C order; NaNs are made one
canonical NaN first (their sign and payload follow operand order, which a compiler may
swap without changing any other result).

Regenerate the corpus only deliberately, from a tree whose results are the reference
(today's main when it was saved), from the repository root::

    PYTHONPATH=$PWD python -m tests._corpus --write

It refuses to write if any case differs between 1, 2 and 3 threads. Without ``--write``
it checks the tree against the saved corpus and prints the arrays that differ
(``-k TEXT`` keeps the cases whose id contains TEXT; ``--threads 1,4`` other counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

import cbn
from cbn import functional as F

CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                           "kernel_corpus.json")
FORMAT = 1
THREAD_COUNTS = (1, 2, 3)

#: cbn._threads.MIN_PARALLEL_SIZE when the corpus was made (a literal on purpose: the
#: corpus must not move with the threshold; a test checks the two agree)
PARALLEL_SIZE = 1 << 16

_DTYPES = {"f32": np.float32, "f64": np.float64, "f16": np.float16}
try:
    import ml_dtypes as _ml_dtypes
except ImportError:                                  # the bfloat16 cases are not enumerated
    _ml_dtypes = None
else:
    _DTYPES["bf16"] = _ml_dtypes.bfloat16
#: half storage with parameters and running statistics of its own dtype ("f16h", "bf16h");
#: "f16" and "bf16" have float32 ones (PyTorch's mixed mode)
for _h in ("f16", "bf16"):
    if _h in _DTYPES:
        _DTYPES[_h + "h"] = _DTYPES[_h]
HALF = ("f16", "bf16", "f16h", "bf16h")


def param_dtype(dtype: str):
    """The dtype of a case's weight, bias and running statistics."""
    return np.float32 if dtype in ("f16", "bf16") else _DTYPES[dtype]


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One input: shape, channel axis, dtype ("f32", "f64", or a half one of HALF), kind of data and
    memory layout ("C", "F", "cl" channels-last memory, "sliced", "sub" subclass)."""

    shape: Tuple[int, ...]
    axis: int
    dtype: str
    data: str = "normal"
    layout: str = "C"

    @property
    def id(self) -> str:
        return (f"{'x'.join(map(str, self.shape))}-ax{self.axis}-{self.dtype}-{self.data}"
                f"-{self.layout}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def _big(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """``shape`` with its first axis repeated until it holds >= PARALLEL_SIZE values."""
    reps = -(-PARALLEL_SIZE // math.prod(shape))
    return (shape[0] * reps,) + tuple(shape[1:])


# tests/test_kernel_paths.py's PATHS: (shape, axis)
PATHS = [
    ((96, 16), 1),             # rows: glued rows of 8 vectors
    ((40, 3, 2), 1),           # rows: K = 2, glued C*K = 6
    ((7, 5, 5, 64), -1),       # rows: C = 64, glued rows of 8 vectors (f32: a tail of 4)
    ((50, 144), 1),            # rows: 18 (f32) or 36 (f64) vectors, memory-order loops
    ((3, 4, 6, 256), -1),      # rows: 16 or 32 vectors
    ((33, 1001), 1),           # rows: width not a multiple of the vector (column loops)
    ((37, 7), 1),              # rows: a tail of m-rows after the last glued row
    ((6, 5, 17), 1),           # planes: K = 17, one value past the vectors
    ((4, 6, 14, 14), 1),       # planes: K = 196, vector tails
    ((2, 3, 4100), 1),         # planes: a plane longer than a statistics block
    ((3, 7, 30000), 1),        # planes: work items straddle channels and batch entries
]

# tests/test_plain_path.py's CASES and tests/conftest.py's CASES (2D to 5D, both axes)
SMALL = [
    ((6, 5), 1), ((4, 6, 3, 3), 1), ((4, 3, 3, 6), -1), ((3, 4, 5), 2),
    ((6, 3), 1), ((6, 3), -1), ((5, 4), 0), ((4, 5, 7), 1), ((4, 7, 5), -1),
    ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1), ((3, 4, 5, 6), 2), ((2, 3, 4, 3, 5), 1),
    ((2, 4, 3, 5, 3), -1),
]

# more loop shapes and their edges
EDGES = [
    ((8, 3, 15), 1),           # rows: K = 15, one below the planes threshold
    ((8, 3, 16), 1),           # planes: K = 16 exactly
    ((4, 3, 3, 5), 1),         # rows: K = 15 in 4D
    ((4, 3, 4, 4), 1),         # planes: K = 16 in 4D
    ((5, 4, 31), 1),           # planes: K = 31 (f32: 3 vectors and 7 values)
    ((5, 4, 33), 1),           # planes: K = 33 (one value past 4 vectors of f32)
    ((3, 2, 4096), 1),         # planes: one statistics block exactly
    ((2, 2, 4097), 1),         # planes: two blocks, the second of one value
    ((90, 3, 100), 1),         # planes: short planes 40 at a time, a remainder of 10
    ((2, 2, 16385), 1),        # planes: two element-wise chunks per plane (parallel)
    ((3, 7), 1),               # rows: no full glued row, only a tail
    ((2, 9), 1),               # rows: no full glued row (f64 too)
    ((17, 16), 1), ((18, 16), 1), ((19, 16), 1), ((20, 16), 1),   # rows: glued-row
    ((21, 16), 1), ((22, 16), 1), ((23, 16), 1),                  # tails of 1-7 vectors
    ((17, 8), 1), ((13, 8), 1), ((15, 8), 1),                     # ... and narrower
    ((30, 40), 1),             # rows: glued rows of 5 vectors
    ((26, 24), 1),             # rows: 6 vectors (f32: 4 m-rows glued, f64: 2)
    ((12, 200), 1),            # rows: 4 m-rows glued to 800 values (wide)
    ((51, 144), 1),            # rows: a tail of one m-row wider than 8 vectors
    ((40, 12, 10), 1),         # rows: K = 10, glued to 480 values (wide, K > 1)
    ((6, 101, 11), 1),         # rows: K = 11, 1111 values per row (column loops)
    ((20, 2048), 1),           # rows: 2048 channels (wide)
    ((9, 3, 1), 1),            # rows: K = 1 along a trailing axis of size 1
    ((2, 200, 16), 1),         # planes: 200 units in 128 work items (some hold two)
]

# larger inputs (parallel on 2 and 3 threads), beyond the paths enlarged
PARALLEL = [
    ((4095, 16), 1),           # 65520 values: one thread whatever is asked
    ((4096, 16), 1),           # 65536 values: exactly the parallel threshold
    ((16411, 5), 1),           # odd number of rows, a tail
    ((3, 101, 67, 5), -1),     # channels-last, odd sizes
    ((4, 8, 64, 64), 1),       # NCHW
    ((2, 3, 9, 41, 61), 1),    # 5D
    ((4, 4, 64, 64), -1),      # NHWC with C = 64
    ((240, 3, 100), 1),        # short planes in several m-blocks
    (_big((40, 12, 10)), 1),   # rows, K > 1, wide
    (_big((6, 101, 11)), 1),   # rows, K > 1, column loops
    ((21, 200, 16), 1),        # planes: 200 units in 128 items, parallel
    ((16384, 16), 1),          # rows: 4 statistics blocks, merged in item order
    ((8, 32, 32, 32), -1),     # rows: channels-last, 4 blocks
]

#: rows: 129 statistics blocks of 65536 values, more than the 128 work items, so that
#: items hold two blocks (the second shifted by the first's mean): float32 with a large
#: mean (where that shift shows in float32 results), training forward, eval forward and
#: backward only (8.4 million values)
HUGE = ((528400, 16), 1)
HUGE_SIZE = 1 << 22


#: (shape, data, layout) of the large inputs that run every call, not only the core ones
FULL_BIG = {(_big((96, 16)), "normal", "C"), (_big((4, 6, 14, 14)), "normal", "C")}


def cases() -> List[Case]:
    """Every case of the corpus, in a fixed order (ids are unique)."""
    out: List[Case] = []

    def add(shape, axis, dtypes=("f32", "f64"), data=("normal",), layouts=("C",)):
        for d in data:
            for lay in layouts:
                for dt in dtypes:
                    out.append(Case(tuple(shape), axis, dt, d, lay))

    for shape, axis in PATHS:
        add(shape, axis, data=("normal", "offset", "ramp"))
        if math.prod(shape) < PARALLEL_SIZE:
            add(_big(shape), axis, data=("normal", "ramp"))
    for shape, axis in SMALL + EDGES:
        add(shape, axis)
    for shape, axis in PARALLEL:
        add(shape, axis)
    add(*HUGE, dtypes=("f32",), data=("offset",))

    # large means, trends and special values on other shapes
    for shape, axis in [((6, 3), -1), ((3, 5, 6, 4), -1), ((2, 3, 4, 3, 5), 1),
                        ((8, 3, 16), 1), ((8, 3, 15), 1), ((90, 3, 100), 1),
                        ((4096, 16), 1), ((3, 101, 67, 5), -1)]:
        add(shape, axis, data=("offset", "ramp"))
    for shape, axis in [((96, 16), 1), (_big((96, 16)), 1), ((7, 5, 5, 64), -1),
                        ((50, 144), 1), ((33, 1001), 1), ((4, 6, 14, 14), 1),
                        ((40, 12, 10), 1)]:
        add(shape, axis, data=("ramp1",))
    for shape, axis in [((96, 16), 1), ((4, 6, 14, 14), 1), ((3, 5, 6, 4), -1),
                        ((6, 5, 17), 1), ((37, 7), 1), (_big((4, 6, 14, 14)), 1)]:
        add(shape, axis, data=("special",))

    # the general path: other memory layouts, and plain memory through a subclass
    add((4, 6, 14, 14), 1, layouts=("F", "cl", "sliced", "sub"))
    add((3, 5, 6, 4), -1, layouts=("F", "sliced", "sub"))
    add((2, 3, 4, 3, 5), 1, layouts=("cl", "F"))
    add((96, 16), 1, layouts=("F", "sub"))
    add((33, 1001), 1, layouts=("sliced",))
    add((40, 3, 2), 1, layouts=("cl",))
    add(_big((4, 6, 14, 14)), 1, layouts=("cl", "sub"))
    add(_big((7, 5, 5, 64)), -1, layouts=("F",))
    add((4, 6, 14, 14), 1, data=("offset", "ramp"), layouts=("cl",))

    # half precision (computed in float32)
    for shape, axis in [((96, 16), 1), ((4, 6, 14, 14), 1), ((37, 7), 1),
                        ((3, 5, 6, 4), -1), (_big((4, 6, 14, 14)), 1)]:
        add(shape, axis, dtypes=("f16",))
    add((4, 6, 14, 14), 1, dtypes=("f16",), data=("offset",))
    add((4, 6, 14, 14), 1, dtypes=("f16",), layouts=("cl",))
    # bfloat16 (ml_dtypes), and both half types with half parameters: every loop shape
    halves = tuple(d for d in HALF if d != "f16" and d in _DTYPES)
    for shape, axis in [((96, 16), 1), ((4, 6, 14, 14), 1), ((37, 7), 1), ((8, 3, 17), 1),
                        ((3, 5, 6, 4), -1), ((7, 5, 5, 64), -1), (_big((4, 6, 14, 14)), 1),
                        (_big((96, 16)), 1), ((2, 3, 4, 3, 5), 1)]:
        add(shape, axis, dtypes=halves)
    add((4, 6, 14, 14), 1, dtypes=halves, data=("offset", "special"))
    add((3, 5, 6, 4), -1, dtypes=halves, data=("ramp",), layouts=("cl", "F"))

    ids = [c.id for c in out]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    return out


# ----------------------------------------------------------------------------- inputs


class _Sub(np.ndarray):
    """An ndarray subclass: never a plain call, always cbn.functional's general path."""


def _channel_shape(ndim: int, axis: int) -> Tuple[int, ...]:
    s = [1] * ndim
    s[axis % ndim] = -1
    return tuple(s)


def _layout(a: np.ndarray, layout: str, axis: int) -> np.ndarray:
    """``a``'s values (same shape) in memory laid out as ``layout`` says."""
    if layout in ("C", "sub"):
        a = np.ascontiguousarray(a)
        return a.view(_Sub) if layout == "sub" else a
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "cl":                  # the channel axis innermost in memory
        ax = axis % a.ndim
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, ax, -1)), -1, ax)
    if layout == "sliced":              # every other element of the last axis
        base = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        base[..., ::2] = a
        return base[..., ::2]
    raise ValueError(f"unknown layout {layout!r}")


@dataclass
class Inputs:
    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    grad: np.ndarray
    residual: np.ndarray

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.x, self.weight, self.bias, self.running_mean, self.running_var,
                  self.grad, self.residual):
            h.update(digest(a).encode())
        return h.hexdigest()


def make_inputs(case: Case) -> Inputs:
    """The case's arrays, from np.random.default_rng(case.seed). Inputs of more than
    HUGE_SIZE values are drawn in float32 (in half the time) and their residual is
    zero (their calls take none)."""
    rng = np.random.default_rng(case.seed)
    shape, axis = case.shape, case.axis
    ndim = len(shape)
    C = shape[axis]
    cs = _channel_shape(ndim, axis)
    mean = rng.uniform(-3.0, 3.0, C).reshape(cs)
    std = rng.uniform(0.5, 2.0, C).reshape(cs)
    huge = case.size > HUGE_SIZE
    draw = np.float32 if huge else np.float64
    x = rng.standard_normal(shape, dtype=draw)
    x *= std.astype(draw)
    x += mean.astype(draw)
    if case.data == "offset":
        x += 1000.0
    elif case.data in ("ramp", "ramp1"):
        # a trend along the memory order of every channel (of channel 0 for ramp1)
        t = np.arange(x.size, dtype=np.float64).reshape(shape) * (50.0 / x.size)
        if case.data == "ramp1":
            t *= (np.arange(C) == 0).reshape(cs)
        x += t
    elif case.data == "special":
        xm = np.moveaxis(x, axis, 0)
        xm[0] = 2.5                     # a constant channel (eps = 0: invstd 0)
        xm[1].flat[xm[1].size // 2] = np.nan
    elif case.data != "normal":
        raise ValueError(f"unknown data {case.data!r}")

    pdtype = param_dtype(case.dtype)
    weight = rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C)
    bias = rng.uniform(-1.0, 1.0, C)
    rm = rng.uniform(-1.0, 1.0, C)
    rv = rng.uniform(0.5, 2.0, C)
    grad = rng.standard_normal(shape, dtype=draw)
    residual = np.zeros(shape, draw) if huge else rng.standard_normal(shape)

    def like_x(a):
        return _layout(a.astype(_DTYPES[case.dtype], copy=False), case.layout, axis)

    return Inputs(like_x(x), weight.astype(pdtype), bias.astype(pdtype),
                  rm.astype(pdtype), rv.astype(pdtype), like_x(grad), like_x(residual))


# ------------------------------------------------------------------------------ digests


def digest(a, nans: bool = True) -> str:
    """SHA-256 of an array's dtype, shape and values in C order, NaNs made canonical
    (``nans=False``: the caller knows there are none)."""
    a = np.asarray(a)
    ml = a.dtype.kind == "V"            # ml_dtypes' bfloat16: named by its name, not "<V2"
    if nans and (a.dtype.kind == "f" or ml):
        nan = np.isnan(a.astype(np.float32) if ml else a)
        if nan.any():
            a = np.where(nan, np.array(np.nan, a.dtype), a)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.name if ml else a.dtype.str}{a.shape}".encode())
    h.update(a.view(np.uint8).data if ml else a.data)
    return h.hexdigest()


# ------------------------------------------------------------------------------ compute


def _copy(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if a is None else a.copy()


_MODULES = {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d, 4: cbn.BatchNorm2d, 5: cbn.BatchNorm3d}


def compute(case: Case, inp: Inputs, n_threads: int) -> Dict[str, np.ndarray]:
    """Every output of the public API for one case on ``n_threads``: name -> array.

    Inputs of PARALLEL_SIZE values or more, whose loop bodies the smaller cases of the
    same widths cover, run fewer calls (each parallel region is slow on a busy machine):
    normal data in C order the core ones (the plain and the fused ReLU + residual
    forward and backward, training and eval, in place, normalize), other data, other
    layouts and HUGE the training forward, the eval forward and the training backward;
    a few run
    every call (modules included: set_num_threads reaching the kernels in parallel).
    """
    full = case.size < PARALLEL_SIZE or (case.shape, case.data, case.layout) in FULL_BIG
    core = full or (case.data == "normal" and case.layout == "C"
                    and (case.shape, case.axis) != HUGE)
    x, g, r = inp.x, inp.grad, inp.residual
    w, b, rm, rv = inp.weight, inp.bias, inp.running_mean, inp.running_var
    axis = case.axis
    nt: object = n_threads
    wl: object = w
    if case.layout == "sub":            # the general path on the same memory
        nt = np.int64(n_threads)
        wl = w.tolist()
    res: Dict[str, np.ndarray] = {}

    def forward(name, training, weight, bias, run_mean, run_var, momentum=0.1, eps=1e-5,
                keep=("y", "save_mean", "save_invstd"), src=x, **kw):
        run_mean, run_var = _copy(run_mean), _copy(run_var)
        y, sm, si = cbn.batch_norm_forward(src, weight, bias, run_mean, run_var, training,
                                           momentum, eps, axis=axis, n_threads=nt, **kw)
        got = dict(y=y, save_mean=sm, save_invstd=si, running_mean=run_mean,
                   running_var=run_var)
        for k in keep:
            res[f"{name}.{k}"] = got[k]
        return y, sm, si

    def backward(name, *args, **kw):
        names = ("grad_input", "grad_weight", "grad_bias", "grad_residual")
        got = cbn.batch_norm_backward(*args, axis=axis, n_threads=nt, **kw)
        for k, a in zip(names, got):
            res[f"{name}.{k}"] = a

    # forward, training and eval, with and without the optional vectors
    everything = ("y", "save_mean", "save_invstd", "running_mean", "running_var")
    _, sm, si = forward("train", True, wl, b, rm, rv, keep=everything)
    _, em, ei = forward("eval", False, wl, b, rm, rv)
    if full:
        forward("train_bare", True, None, None, None, None)
        forward("train_w_rm_eps0", True, wl, None, rm, None, momentum=0.3, eps=0.0,
                keep=("y", "save_invstd", "running_mean"))
        forward("train_b_rv_mom1", True, None, b, None, rv, momentum=1.0,
                keep=("y", "running_var"))
        forward("eval_bare_eps0", False, None, None, rm, rv, eps=0.0,
                keep=("y", "save_invstd"))

    backward("bwd_train", g, x, wl, sm, si, True)
    if not core:
        return res

    # fused ReLU and residual
    yrr, smrr, sirr = forward("train_relu_res", True, wl, b, rm, rv, activation="relu",
                              residual=r, keep=everything)
    yerr, _, _ = forward("eval_relu_res", False, wl, b, rm, rv, activation="relu",
                         residual=r, keep=("y",))
    if full:
        yr, smr, sir = forward("train_relu", True, wl, b, rm, rv, activation="relu",
                               keep=("y",))
        forward("train_res", True, wl, b, rm, rv, residual=r, keep=("y",))
        yer, _, _ = forward("eval_relu", False, wl, b, rm, rv, activation="relu",
                            keep=("y",))
        forward("eval_res", False, wl, b, rm, rv, residual=r, keep=("y",))

    # out=: a new array like x, a C-ordered one, and x itself (in place, on a copy of x)
    xc = x.copy(order="K")
    forward("train_inplace", True, wl, b, rm, rv, out=xc, src=xc, keep=("y",))
    if full:
        forward("train_out", True, wl, b, rm, rv, out=np.empty_like(x), keep=("y",))
        forward("eval_out_c", False, wl, b, rm, rv, out=np.empty(x.shape, x.dtype),
                keep=("y",))
        xc = x.copy(order="K")
        forward("eval_inplace_relu_res", False, wl, b, rm, rv, out=xc, src=xc,
                activation="relu", residual=r, keep=("y",))

    # backward
    backward("bwd_eval", g, x, wl, em, ei, False)
    backward("bwd_train_relu_res", g, x, wl, smrr, sirr, True, activation="relu",
             output=yrr, residual=True)
    backward("bwd_eval_relu_res", g, x, wl, em, ei, False, activation="relu", output=yerr,
             residual=True)
    if full:
        backward("bwd_train_bare", g, x, None, sm, si, True)
        backward("bwd_train_relu", g, x, wl, smr, sir, True, activation="relu", output=yr)
        backward("bwd_train_res", g, x, wl, sm, si, True, residual=True)
        backward("bwd_eval_relu", g, x, wl, em, ei, False, activation="relu", output=yer)
        backward("bwd_eval_res", g, x, None, em, ei, False, residual=True)

    # functional's eval building blocks
    pdtype = np.float64 if w.dtype == np.float64 else np.float32   # the compute dtype
    invstd, scale, shift = F.eval_parameters(wl, b, rv, 1e-5, pdtype)
    res.update({"eval_parameters.invstd": invstd, "eval_parameters.scale": scale,
                "eval_parameters.shift": shift})
    res["normalize_relu_res.y"] = F.normalize(x, rm, scale, shift, axis=axis, n_threads=nt,
                                              activation="relu", residual=r)
    if full:
        res["normalize.y"] = F.normalize(x, rm, scale, shift, axis=axis, n_threads=nt)
        _, s0, h0 = F.eval_parameters(None, None, rv, 0.0, pdtype)
        res["normalize_bare.y"] = F.normalize(x, rm, s0, h0, axis=axis, n_threads=nt,
                                              out=x.copy(order="K"))

    # modules (threads through set_num_threads): momentum=None, frozen eval, ReLU; their
    # parameters are float32 or float64
    if not full or pdtype not in (np.float32, np.float64):
        return res
    cls = _MODULES[x.ndim]
    cbn.set_num_threads(n_threads)
    try:
        m = cls(x.shape[axis], momentum=None, dtype=pdtype, axis=axis)
        m.weight[...] = w
        m.bias[...] = b
        res["module.train1.y"] = m(x)
        res["module.train1.grad_input"] = m.backward(g)
        res["module.train2.y"] = m(r)
        res["module.train2.grad_input"] = m.backward(g)
        for k in ("running_mean", "running_var", "grad_weight", "grad_bias"):
            res[f"module.{k}"] = getattr(m, k).copy()
        m.freeze()
        res["module.frozen.y"] = m(x)
        res["module.frozen.grad_input"] = m.backward(g)
        m.unfreeze()
        res["module.eval.y"] = m(x)
        mr = cls(x.shape[axis], dtype=pdtype, axis=axis, activation="relu")
        mr.weight[...] = w
        mr.bias[...] = b
        mr.running_mean[...] = rm
        mr.running_var[...] = rv
        mr.freeze()
        res["module_relu.frozen.y"] = mr(x)
        res["module_relu.frozen.grad_input"] = mr.backward(g)
    finally:
        cbn.set_num_threads(None)
    return res


def digests(case: Case, inp: Inputs, n_threads: int) -> Dict[str, str]:
    """name -> SHA-256 of every output of :func:`compute`."""
    nans = case.data == "special"
    return {k: digest(v, nans) for k, v in compute(case, inp, n_threads).items()}


# -------------------------------------------------------------------------- the corpus


def load(path: str = CORPUS_PATH) -> dict:
    """The saved corpus: {"format", "numpy", "commit", "cases": {id: {"inputs",
    "outputs": {name: sha256}}}}."""
    with open(path) as f:
        corpus = json.load(f)
    if corpus.get("format") != FORMAT:
        raise ValueError(f"{path}: format {corpus.get('format')!r}, expected {FORMAT}")
    return corpus


def compare(saved: Dict[str, str], got: Dict[str, str]) -> List[str]:
    """Names of the arrays that differ (or exist on one side only), sorted."""
    return sorted(k for k in set(saved) | set(got) if saved.get(k) != got.get(k))


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "cbn"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+changes in cbn/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(path: str = CORPUS_PATH, threads: Sequence[int] = THREAD_COUNTS) -> int:
    """Compute every case and save the corpus; refuses (SystemExit) if a case differs
    between thread counts. Returns the number of cases."""
    out = {}
    for case in cases():
        inp = make_inputs(case)
        ref = digests(case, inp, threads[0])
        for nt in threads[1:]:
            bad = compare(ref, digests(case, inp, nt))
            if bad:
                raise SystemExit(f"{case.id}: {', '.join(bad)} differ between "
                                 f"{threads[0]} and {nt} threads; corpus not written")
        out[case.id] = {"inputs": inp.digest(), "outputs": ref}
    corpus = {"format": FORMAT, "numpy": np.__version__, "commit": _commit(),
              "cases": out}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(corpus, f, indent=0, sort_keys=True)
        f.write("\n")
    return len(out)


def check(selected: Iterator[Case], threads: Sequence[int] = THREAD_COUNTS,
          path: str = CORPUS_PATH) -> List[str]:
    """Lines describing every difference from the saved corpus (empty: none)."""
    saved = load(path)["cases"]
    lines = []
    for case in selected:
        if case.id not in saved:
            lines.append(f"{case.id}: not in the saved corpus")
            continue
        inp = make_inputs(case)
        if inp.digest() != saved[case.id]["inputs"]:
            lines.append(f"{case.id}: the inputs differ from the saved ones (NumPy's "
                         "generator changed?)")
            continue
        for nt in threads:
            bad = compare(saved[case.id]["outputs"], digests(case, inp, nt))
            if bad:
                lines.append(f"{case.id} on {nt} thread(s): {', '.join(bad)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests._corpus",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true",
                   help="recompute and save the corpus (deliberately: from a reference tree)")
    p.add_argument("-k", default="", help="check only the cases whose id contains this")
    p.add_argument("--threads", default=",".join(map(str, THREAD_COUNTS)),
                   help="thread counts, comma-separated (default 1,2,3)")
    p.add_argument("--path", default=CORPUS_PATH)
    args = p.parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(","))
    if args.write:
        n = write(args.path, threads)
        print(f"wrote {n} cases to {args.path}")
        return 0
    selected = [c for c in cases() if args.k in c.id]
    lines = check(iter(selected), threads, args.path)
    print("\n".join(lines) if lines else
          f"{len(selected)} cases on {threads} threads: identical to the corpus")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
