"""One-process speed comparison of cbn's batch norm (``python -m cbn bench``).

Every figure is a median taken in one process, with implementations interleaved round by
round (copy, cbn, torch, ONNX Runtime, NumPy in the same loop) so that the noise of a shared
machine hits them all alike. The implementations:

``copy``     ``np.copyto(preallocated, x)``: one read + one write of the array, the
             memory-bandwidth floor (eval forward is one read + one write, training forward
             two reads + one write, backward four reads + one write; ratios are always
             relative to one copy of an array of the input's size).
``cbn``      ``cbn.batch_norm_forward`` / ``cbn.batch_norm_backward`` as a user calls them
             (output allocated by the call), ``n_threads=`` the thread count of the row.
``cbn_out``  the same call writing into a preallocated ``out=`` (the input gradient for
             the backward), which is the figure to hold against ``copy`` (neither
             allocates).
``torch``    ``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward`` on tensors
             sharing the NumPy arrays' memory (channels-last: the NHWC array permuted to
             NCHW, i.e. PyTorch's channels_last memory format), ``torch.set_num_threads``.
``ort``      eval forward, NCHW only: ONNX Runtime's BatchNormalization in a one-node model
             built with ``onnx.helper`` (``intra_op_num_threads``, spinning off).
``numpy``    :mod:`cbn._reference`, plain NumPy in float64: the baseline the asv suite
             tracks. Slow on big inputs, so it is timed with fewer repeats there.

The NumPy reference and the copy are single-threaded whatever the row's thread count.

``--processes N`` switches to the contention mode (:func:`contention`): cbn alone, on one
thread, in a quiet phase first; then N processes, each calling cbn at its default thread
count on the same shapes at the same time, round after round; with ``--busy-thread`` each
of them also runs a thread that keeps one core busy outside OpenMP. The same N processes
then run forced to one thread, and (where torch imports) calling PyTorch instead, so each
row holds cbn under contention against both and says whether it meets the contention
target.

Timing and tables come from :mod:`cbn._timing`, the harness the asv suite uses too; the data
(and the layout names ``channels_first`` / ``channels_last``) from :mod:`cbn._benchdata`,
which the asv suite uses too. Long runs report their progress on stderr (:class:`Progress`);
the table goes to stdout row by row (flushed), 100 columns wide unless ``--wide``;
``--plot`` draws :func:`plot`'s chart; ``--case resnet50`` times the 53 BatchNorm2d layers
of ResNet-50 and sums them (:func:`set_totals`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import cbn
from cbn import _reference
from cbn._benchdata import (LAYOUTS, RESNET50_BN, SHORT, array_shape, case_name,
                            layout_applies, make_case, parse_layout, parse_shape)
from cbn._timing import SLOW_CALL, Table, calibrate, fmt_ratio, fmt_time, measure

__all__ = ["main", "speed_table", "run", "contention", "plot", "CASES", "QUICK_CASES",
           "CASE_SETS", "CONTENTION_CASES"]

#: Shapes in NCHW order (channels second). Channels-last rows use the same logical shape
#: stored as (N, *spatial, C) with ``axis=-1``; 2D shapes have a single layout.
CASES: List[tuple] = [
    (32, 64, 56, 56),
    (64, 128, 28, 28),
    (16, 256, 14, 14),
    (8, 3, 224, 224),
    (32, 3, 224, 224),     # the memory-floor cases (channel-blocked passes)
    (256, 1024),
    (4, 32, 16, 32, 32),
    (16, 32, 16, 32, 32),
    (8, 16),          # per-call overhead
    (2, 8, 4, 4),     # per-call overhead
]
QUICK_CASES: List[tuple] = [(16, 256, 14, 14), (256, 1024), (2, 8, 4, 4)]
#: Named sets of cases for ``--case NAME``: {name: {shape: how many layers have it}}.
#: ``resnet50``: the input shapes of the 53 BatchNorm2d layers of ResNet-50 at batch 16
#: (cbn._benchdata.RESNET50_BN); the summary adds each op's time over all 53 layers.
CASE_SETS: Dict[str, Dict[tuple, int]] = {
    "resnet50": {(16,) + chw: count for chw, count in RESNET50_BN},
}

DTYPES = ("float32", "float64")
#: Accepted by --dtype besides DTYPES: stored in 16 bits, computed in float32 (bfloat16
#: needs ml_dtypes), by cbn's half loops (conversion in registers).
HALF_DTYPES = ("float16", "bfloat16")
OPS = ("train", "eval", "backward", "train_fused", "eval_fused")
IMPLS = ("copy", "cbn", "cbn_out", "torch", "ort", "numpy")
OP_TITLES = {"train": "training forward", "eval": "eval forward",
             "backward": "backward (training)",
             "train_fused": "training forward, relu(bn(x) + residual)",
             "eval_fused": "eval forward, relu(bn(x) + residual)"}

EPS = 1e-5
MOMENTUM = 0.1

#: Contention mode: (shape in NCHW order, layout), float32 sizes from 0.1 MB to 30 MB
#: (4x16x20x20 and 24x1024: 0.1 MB; 16x64x28x28: 3.2 MB; 256x1024: 1 MB; 32x64x56x56:
#: 26 MB; 7168x1024: 29 MB).
CONTENTION_CASES: List[tuple] = [
    ((4, 16, 20, 20), "channels_first"), ((16, 64, 28, 28), "channels_first"),
    ((32, 64, 56, 56), "channels_first"), ((4, 16, 20, 20), "channels_last"),
    ((16, 64, 28, 28), "channels_last"), ((32, 64, 56, 56), "channels_last"),
    ((24, 1024), "channels_first"), ((256, 1024), "channels_first"),
    ((7168, 1024), "channels_first"),
]
CONTENTION_OPS = ("train", "eval", "backward")


def _parse_case(text: str) -> tuple:
    try:
        return parse_shape(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad case {text!r}: expected e.g. 32x64x56x56")


# --------------------------------------------------------------------------- optional peers


def _import_torch():
    try:
        import torch
    except Exception:
        return None
    return torch


def _import_ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception:
        return None
    return onnxruntime


def _versions() -> Dict[str, Optional[str]]:
    out = {"cbn": cbn.__version__, "numpy": np.__version__, "python": platform.python_version()}
    torch = sys.modules.get("torch")
    out["torch"] = getattr(torch, "__version__", None) if torch else None
    ort = sys.modules.get("onnxruntime")
    out["onnxruntime"] = getattr(ort, "__version__", None) if ort else None
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

# --------------------------------------------------------------------------- one row


def _is_bfloat16(dtype) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def _to_torch_view(torch, a, layout):
    """A tensor sharing ``a``'s memory with NCHW logical shape (channels_last if NHWC)."""
    if _is_bfloat16(a.dtype):
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    if layout == "channels_last" and a.ndim > 2:
        nd = a.ndim
        t = t.permute(0, nd - 1, *range(1, nd - 1))
    return t


def _from_torch_view(torch, t, layout, dtype):
    """The NumPy array of a result tensor, back in ``layout`` (bfloat16 through int16)."""
    if layout == "channels_last" and t.dim() > 2:
        nd = t.dim()
        t = t.permute(0, *range(2, nd), 1)
    if _is_bfloat16(dtype):
        return t.contiguous().view(torch.int16).numpy().view(dtype)
    return t.numpy()


def _ort_eval(ort, x, w, b, rm, rv, threads):
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    X = helper.make_tensor_value_info("X", elem, list(x.shape))
    Y = helper.make_tensor_value_info("Y", elem, list(x.shape))
    inits = [numpy_helper.from_array(np.ascontiguousarray(a), name)
             for a, name in ((w, "scale"), (b, "B"), (rm, "mean"), (rv, "var"))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
                            epsilon=EPS)
    graph = helper.make_graph([node], "bn", [X], [Y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    feed = {"X": x}
    return lambda: sess.run(None, feed)[0]


def _setup_row(shape, dtype, layout, threads, op, impls, torch, ort, seed=0):
    """Callables for one row, in the order they are interleaved. The data are
    :func:`cbn._benchdata.make_case`'s, as in the asv suite."""
    dtype = np.dtype(dtype)
    training = op not in ("eval", "eval_fused")
    # The fused ops add a residual and a ReLU: cbn does it in its one output pass; torch
    # and NumPy, which have no such fusion on the CPU, do it as two more element-wise ops.
    fused = op.endswith("_fused")
    d = make_case(shape, dtype, layout, seed, residual=fused)
    x, w, b, rm0, rv0, axis, r = d.x, d.w, d.b, d.rm, d.rv, d.axis, d.r
    buf = np.empty_like(x)
    extra = {"activation": "relu", "residual": r} if fused else {}
    fns: Dict[str, Callable] = {}
    notes = {}

    if "copy" in impls:
        fns["copy"] = lambda: np.copyto(buf, x)

    if op == "backward":
        g = d.g
        _, sm, si = cbn.batch_norm_forward(x, w, b, None, None, True, MOMENTUM, EPS, axis=axis)
        if "cbn" in impls:
            fns["cbn"] = lambda: cbn.batch_norm_backward(g, x, w, sm, si, True, axis=axis,
                                                         n_threads=threads)[0]
        if "cbn_out" in impls:
            gout = np.empty_like(x)
            fns["cbn_out"] = lambda: cbn.batch_norm_backward(g, x, w, sm, si, True, axis=axis,
                                                             n_threads=threads, out=gout)[0]
        if "torch" in impls and torch is not None:
            tg, tx = _to_torch_view(torch, g, layout), _to_torch_view(torch, x, layout)
            tw, tsm, tsi = (torch.from_numpy(a.copy()) for a in (w, sm, si))
            trm, trv = torch.from_numpy(rm0.copy()), torch.from_numpy(rv0.copy())
            nbb = torch.ops.aten.native_batch_norm_backward
            mask = [True, True, True]
            fns["torch"] = _first_call_copies(
                lambda: _from_torch_view(
                    torch, nbb(tg, tx, tw, trm, trv, tsm, tsi, True, EPS, mask)[0], layout,
                    dtype),
                lambda: nbb(tg, tx, tw, trm, trv, tsm, tsi, True, EPS, mask))
        if "numpy" in impls:
            fns["numpy"] = lambda: _reference.batch_norm_backward(g, x, w, sm, si, True,
                                                                  axis=axis)[0]
        return fns, notes

    if "cbn" in impls:
        rm, rv = rm0.copy(), rv0.copy()
        fns["cbn"] = lambda: cbn.batch_norm_forward(x, w, b, rm, rv, training, MOMENTUM, EPS,
                                                    axis=axis, n_threads=threads, **extra)[0]
    if "cbn_out" in impls:
        rm2, rv2, out = rm0.copy(), rv0.copy(), np.empty_like(x)
        fns["cbn_out"] = lambda: cbn.batch_norm_forward(x, w, b, rm2, rv2, training, MOMENTUM,
                                                        EPS, axis=axis, out=out,
                                                        n_threads=threads, **extra)[0]
    if "torch" in impls and torch is not None:
        tx = _to_torch_view(torch, x, layout)
        tw, tb = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
        trm, trv = torch.from_numpy(rm0.copy()), torch.from_numpy(rv0.copy())
        nb = torch.ops.aten.native_batch_norm
        if fused:
            tr = _to_torch_view(torch, r, layout)
            timed = lambda: torch.relu_(nb(tx, tw, tb, trm, trv, training, MOMENTUM, EPS)[0]
                                        .add_(tr))
        else:
            timed = lambda: nb(tx, tw, tb, trm, trv, training, MOMENTUM, EPS)[0]
        fns["torch"] = _first_call_copies(
            lambda: _from_torch_view(torch, timed(), layout, dtype), timed)
    if "ort" in impls and ort is not None and op == "eval":
        if layout == "channels_last" and len(shape) > 2:
            notes["ort"] = "ONNX BatchNormalization is channels-first only"
        elif dtype.itemsize == 2:
            notes["ort"] = "not timed for half-precision inputs"
        else:
            try:
                fns["ort"] = _ort_eval(ort, x, w, b, rm0.copy(), rv0.copy(), threads)
            except Exception as e:  # an ORT build without this kernel/dtype
                notes["ort"] = f"{type(e).__name__}: {e}"[:200]
    if "numpy" in impls:
        nrm, nrv = rm0.copy(), rv0.copy()
        ref = lambda: _reference.batch_norm_forward(x, w, b, nrm, nrv, training, MOMENTUM,
                                                    EPS, axis=axis)[0]
        fns["numpy"] = (lambda: np.maximum(ref() + r, 0)) if fused else ref
    return fns, notes


def _first_call_copies(first, rest):
    """A callable whose first call runs ``first`` (which returns a NumPy result to check)
    and every later call ``rest`` (the timed form, without the conversion)."""
    state = {"first": True}

    def call():
        if state["first"]:
            state["first"] = False
            return first()
        return rest()
    return call


def _check(results, dtype):
    """Names of implementations whose output differs from cbn's beyond tolerance."""
    ref = results.get("cbn", {}).get("result")
    if not isinstance(ref, np.ndarray):
        return []
    tol = {2: 3e-2, 4: 2e-3}.get(np.dtype(dtype).itemsize, 1e-9)
    scale = max(1.0, float(np.max(np.abs(ref.astype(np.float64))))) if ref.size else 1.0
    bad = []
    for name, r in results.items():
        got = r.get("result")
        if name in ("copy", "cbn") or not isinstance(got, np.ndarray):
            continue
        if got.shape != ref.shape or (ref.size and float(np.max(np.abs(
                got.astype(np.float64) - ref.astype(np.float64)))) > tol * scale):
            bad.append(name)
    return bad


def _ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def measure_row(shape, dtype, layout, threads, op, *, impls=IMPLS, torch=None, ort=None,
                min_time=0.2, min_repeat=7, numpy_repeat=3) -> dict:
    fns, notes = _setup_row(shape, dtype, layout, threads, op, impls, torch, ort)
    if torch is not None and "torch" in fns:
        torch.set_num_threads(threads)
    # Several threads and PyTorch's OpenMP runtime beside cbn's: time in settled blocks
    # (see measure); otherwise interleave call by call.
    blocks = threads > 1 and "torch" in fns
    # a slow NumPy call is timed numpy_repeat times; cheap ones get the normal treatment
    res = measure(fns, min_time=min_time, min_repeat=min_repeat,
                  slow_caps={"numpy": (SLOW_CALL, numpy_repeat)},
                  settle=0.02 if blocks else 0.0,
                  block_time=max(min_time / 4, 0.01) if blocks else 0.0)
    med = {name: r["median"] for name, r in res.items()}
    ratios = {
        "cbn/copy": _ratio(med.get("cbn"), med.get("copy")),
        "out/copy": _ratio(med.get("cbn_out"), med.get("copy")),
        "torch/cbn": _ratio(med.get("torch"), med.get("cbn")),
        "ort/cbn": _ratio(med.get("ort"), med.get("cbn")),
        "numpy/cbn": _ratio(med.get("numpy"), med.get("cbn")),
    }
    return {
        "case": case_name(shape), "shape": list(shape), "dtype": np.dtype(dtype).name,
        "layout": layout, "axis": array_shape(shape, layout)[1], "threads": threads, "op": op,
        "n_values": int(np.prod(shape)),
        "interleaving": "settled blocks" if blocks else "call by call",
        "median_s": med,
        "min_s": {name: r["min"] for name, r in res.items()},
        "samples": {name: r["samples"] for name, r in res.items()},
        "calls_per_sample": {name: r["number"] for name, r in res.items()},
        "ratios": {k: v for k, v in ratios.items() if v is not None},
        "mismatch": _check(res, dtype),
        "notes": notes,
    }



# --------------------------------------------------------------------------- printing


RATIO_KEYS = ("cbn/copy", "out/copy", "torch/cbn", "ort/cbn", "numpy/cbn")
_RATIO_PARTS = {"cbn/copy": ("cbn", "copy"), "out/copy": ("cbn_out", "copy"),
                "torch/cbn": ("torch", "cbn"), "ort/cbn": ("ort", "cbn"),
                "numpy/cbn": ("numpy", "cbn")}
#: Width of a time cell (fmt_time gives at most 7 characters: "999.9us", "99.99ms").
_TIME_WIDTH = 8


#: The ratios of the default table (``--wide``: every time and every ratio).
NARROW_RATIOS = ("torch/cbn", "numpy/cbn", "out/copy")
NARROW_IMPLS = ("cbn", "torch")


class ComparisonTable(Table):
    """The table of :func:`run`: case, dtype, layout, threads, op, one time per
    implementation in use, then the ratios those implementations allow.

    ``wide=False`` (the default of the command line) keeps the times of cbn and torch and
    the ratios torch/cbn, numpy/cbn and out/copy: at most 100 columns for the default
    cases. ``wide=True`` shows every time and every ratio.
    """

    def __init__(self, impls: Sequence[str], cases: Sequence[Sequence[int]],
                 ops: Sequence[str], ratio_keys: Sequence[str] = RATIO_KEYS, file=None,
                 wide: bool = True, dtypes: Sequence[str] = DTYPES):
        shown = IMPLS if wide else NARROW_IMPLS
        self.impls = [i for i in IMPLS if i in impls and i in shown]
        keys = ratio_keys if wide else [k for k in NARROW_RATIOS if k in ratio_keys]
        self.ratio_keys = [k for k in keys if all(i in impls for i in _RATIO_PARTS[k])]
        n = len(self.impls) + len(self.ratio_keys)
        super().__init__(
            ["case", "dtype", "layout", "thr", "op"]
            + [i.replace("cbn_out", "cbn out=") for i in self.impls] + self.ratio_keys,
            align=["<", "<", "<", ">", "<"] + [">"] * n,
            widths=[max([len(case_name(c)) for c in cases] + [4]),
                    max(len(str(getattr(d, "name", d))) for d in dtypes), 6, 3,
                    max(len(op) for op in ops)] + [_TIME_WIDTH - 1] * n,
            file=file)

    def add(self, r: dict) -> None:
        """Print the row of one :func:`measure_row` result."""
        self.row([r["case"], r["dtype"], SHORT.get(r["layout"], r["layout"]), r["threads"],
                  r["op"]]
                 + [fmt_time(r["median_s"].get(i)) for i in self.impls]
                 + [fmt_ratio(r["ratios"].get(k)) for k in self.ratio_keys],
                 suffix=("  MISMATCH: " + ",".join(r["mismatch"]) if r.get("mismatch")
                         else ""))


def geomeans(rows, key) -> Dict[str, dict]:
    """Geometric mean of ratio ``key`` per op over the rows that have it."""
    out = {}
    for op in OPS:
        vals = [r["ratios"][key] for r in rows if r["op"] == op and key in r["ratios"]]
        if vals:
            out[op] = {"geomean": math.exp(sum(math.log(v) for v in vals) / len(vals)),
                       "rows": len(vals), "min": min(vals), "max": max(vals)}
    return out


def describe_environment(threads_list) -> List[str]:
    v = _versions()
    b = _build()
    peers = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime") if v.get(k))
    return [
        f"cbn {v['cbn']} (OpenMP {'on' if cbn.openmp_enabled() else 'off'}, loops for "
        f"{b.get('cpu_target', '?')}), numpy {v['numpy']}, Python {v['python']}"
        + (f", {peers}" if peers else ""),
        f"CPU: {_cpu_model()}, os.cpu_count() = {os.cpu_count()}; threads per row: "
        f"{', '.join(map(str, threads_list))} (numpy reference and copy: 1)",
        "medians of interleaved rounds; times are per call; copy = np.copyto into a "
        "preallocated array of the input's size; layout first = channels-first (NCHW, "
        "axis=1), last = channels-last (NHWC, axis=-1)",
    ]


class _Printer:
    """Lines printed as they come and kept (for the JSON document's ``table``)."""

    def __init__(self, file=None):
        self.file = file or sys.stdout
        self.lines: List[str] = []

    def __call__(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, file=self.file, flush=True)


# --------------------------------------------------------------------------- driver


class Progress:
    """Row i of N, the time elapsed and an estimate of the time left, on stderr.

    On a terminal one line is rewritten after every row; otherwise (a pipe, a CI log) a line
    is printed every ``every`` seconds, so that a long run shows it is alive without
    burying the table. The estimate weighs each row by its array size (bigger rows take
    longer: the NumPy reference is timed on them) plus a constant (every row times each
    implementation for ``min_time`` at least).
    """

    def __init__(self, weights: Sequence[float], file=None, enabled: bool = True,
                 every: float = 15.0):
        self.weights = list(weights)
        self.total = float(sum(self.weights)) or 1.0
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled and len(self.weights) > 1
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.every = every
        self.start = time.perf_counter()
        self.last = self.start
        self.done = 0
        self.done_weight = 0.0

    @staticmethod
    def _fmt(seconds: float) -> str:
        seconds = int(round(seconds))
        if seconds < 60:
            return f"{seconds}s"
        if seconds < 3600:
            return f"{seconds // 60}m{seconds % 60:02d}s"
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        n = len(self.weights)
        text = f"row {self.done}/{n}, {self._fmt(elapsed)} elapsed"
        if 0 < self.done < n and self.done_weight > 0:
            left = elapsed / self.done_weight * (self.total - self.done_weight)
            text += f", about {self._fmt(left)} left"
        return text

    def step(self) -> None:
        """One more row done."""
        self.done_weight += self.weights[self.done]
        self.done += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        last_row = self.done == len(self.weights)
        if self.tty:
            end = "\n" if last_row else ""
            print("\r" + self.line() + "\x1b[K", end=end, file=self.file, flush=True)
        elif last_row or now - self.last >= self.every:
            print(self.line(), file=self.file, flush=True)
            self.last = now

    def clear(self) -> None:
        """Before other output on a terminal: erase the progress line (it is printed
        again, below that output, at the next step)."""
        if self.enabled and self.tty and 0 < self.done < len(self.weights):
            print("\r\x1b[K", end="", file=self.file, flush=True)


def _row_weight(shape, dtype) -> float:
    return 1.0 + math.prod(shape) * np.dtype(dtype).itemsize / 4e6


def _dtype_available(name: str) -> bool:
    try:
        np.dtype(name)
        return True
    except TypeError:
        if name == "bfloat16":
            try:
                import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
            except ImportError:
                return False
            return True
        return False


def set_totals(rows, layers: Dict[tuple, int]) -> Dict[str, dict]:
    """For a named case set (``--case resnet50``): per dtype, layout, threads and op, each
    implementation's time summed over the layers (median per shape x the number of layers
    with that shape), and the ratios of the sums. Rows of shapes outside ``layers`` are
    left out; a total is given only when every shape of the set has a row."""
    groups: Dict[tuple, list] = {}
    for r in rows:
        key = tuple(r["shape"])
        if key in layers:
            groups.setdefault((r["dtype"], r["layout"], r["threads"], r["op"]), []).append(r)
    out = {}
    for (dtype, layout, threads, op), rs in groups.items():
        if {tuple(r["shape"]) for r in rs} != set(layers):
            continue
        sums = {}
        for impl in IMPLS:
            if all(impl in r["median_s"] for r in rs):
                sums[impl] = sum(r["median_s"][impl] * layers[tuple(r["shape"])] for r in rs)
        ratios = {k: _ratio(sums.get(a), sums.get(b)) for k, (a, b) in _RATIO_PARTS.items()}
        out[f"{dtype} {layout} {threads} {op}"] = {
            "dtype": dtype, "layout": layout, "threads": threads, "op": op,
            "layers": sum(layers.values()), "total_s": sums,
            "ratios": {k: v for k, v in ratios.items() if v is not None}}
    return out


def run(cases=None, dtypes=DTYPES, layouts=LAYOUTS, threads=(1, 2), ops=OPS, impls=IMPLS,
        min_time=0.2, min_repeat=7, numpy_repeat=3, file=None, wide: bool = True,
        progress: bool = False, layers: Optional[Dict[tuple, int]] = None,
        set_name: Optional[str] = None) -> dict:
    """Measure every combination; print the table as it goes (rows flushed as they
    finish) and, with ``progress``, row i of N and an estimate of the time left on stderr.
    ``layers`` ({shape: number of layers}, a named case set such as ``resnet50``) adds the
    time of each op over the whole set. Returns the JSON document."""
    cases = list(CASES if cases is None else cases)
    torch = _import_torch() if "torch" in impls else None
    ort = _import_ort() if "ort" in impls else None
    used = [i for i in impls if (i != "torch" or torch is not None)
            and (i != "ort" or (ort is not None and "eval" in ops))]
    out = file or sys.stdout
    emit = _Printer(out)
    for line in describe_environment(threads):
        emit(line)
    missing = [name for name, mod in (("torch", torch), ("onnxruntime", ort))
               if name.replace("onnxruntime", "ort") in impls and mod is None]
    if missing:
        emit("not importable, skipped: " + ", ".join(missing))
    halves = [d for d in dtypes if np.dtype(d).itemsize == 2]
    if halves:
        emit(f"{', '.join(np.dtype(d).name for d in halves)}: weights and statistics in "
             "float32, computed in float32 (cbn's half loops convert in registers)")
    emit("")
    before = list(emit.lines)
    table = ComparisonTable(used, cases, ops, file=out, wide=wide, dtypes=dtypes)
    todo = [(shape, dtype, layout, n, op) for shape in cases for dtype in dtypes
            for layout in layouts if layout_applies(shape, layout)
            for n in threads for op in ops]
    meter = Progress([_row_weight(t[0], t[1]) for t in todo], enabled=progress)
    table.header()
    torch_threads = torch.get_num_threads() if torch is not None else None
    rows = []
    try:
        for shape, dtype, layout, n, op in todo:
            r = measure_row(shape, dtype, layout, n, op, impls=used, torch=torch, ort=ort,
                            min_time=min_time, min_repeat=min_repeat,
                            numpy_repeat=numpy_repeat)
            rows.append(r)
            meter.clear()
            table.add(r)
            meter.step()
    finally:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
    emit.lines = []
    emit("")
    summary = {}
    for key, title in (("torch/cbn", "torch/cbn (> 1: cbn faster)"),
                       ("ort/cbn", "ort/cbn (> 1: cbn faster)"),
                       ("numpy/cbn", "numpy/cbn"), ("cbn/copy", "cbn/copy"),
                       ("out/copy", "cbn out=/copy")):
        g = geomeans(rows, key)
        if not g:
            continue
        summary[key] = g
        emit(f"geometric mean {title}: " + ", ".join(
            f"{op} {v['geomean']:.2f} ({v['rows']} rows, {v['min']:.2f}..{v['max']:.2f})"
            for op, v in g.items()))
    totals = set_totals(rows, layers) if layers else {}
    if totals:
        emit("")
        emit(f"{set_name or 'case set'}: time over all {sum(layers.values())} layers "
             "(median per shape x layers with that shape)")
        t_impls = [i for i in ("cbn", "cbn_out", "torch", "numpy", "copy") if i in used]
        t_keys = [k for k in ("torch/cbn", "numpy/cbn", "out/copy")
                  if all(i in used for i in _RATIO_PARTS[k])]
        tt = Table(["dtype", "layout", "thr", "op"]
                   + [i.replace("cbn_out", "cbn out=") for i in t_impls] + t_keys,
                   align=["<", "<", ">", "<"] + [">"] * (len(t_impls) + len(t_keys)),
                   widths=[max(len(str(getattr(d, "name", d))) for d in dtypes), 6, 3,
                           max(len(op) for op in ops)]
                   + [_TIME_WIDTH - 1] * (len(t_impls) + len(t_keys)), file=out)
        tt.header()
        for v in totals.values():
            tt.row([v["dtype"], SHORT.get(v["layout"], v["layout"]), v["threads"], v["op"]]
                   + [fmt_time(v["total_s"].get(i)) for i in t_impls]
                   + [fmt_ratio(v["ratios"].get(k)) for k in t_keys])
        emit.lines.extend(tt.render())
    return {
        "meta": {
            "versions": _versions(), "openmp": cbn.openmp_enabled(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "build": _build(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {"min_time": min_time, "min_repeat": min_repeat,
                         "numpy_repeat": numpy_repeat, "eps": EPS, "momentum": MOMENTUM},
            "notes": {"copy": "np.copyto(preallocated, x): the memory-bandwidth floor",
                      "cbn_out": "cbn writing into a preallocated out=",
                      "ratios": "ratios of medians; torch/cbn > 1 means cbn is faster"},
        },
        "rows": rows,
        "geomean": summary,
        "case_set": ({"name": set_name, "layers": [[list(k), v] for k, v in layers.items()],
                      "totals": totals} if layers else None),
        "table": "\n".join(before + table.render() + emit.lines),
    }


def _build() -> Dict[str, object]:
    """How cbn was built and which loops it runs (:func:`cbn.show_config`), if it says."""
    try:
        c = cbn.show_config(mode="dicts")
    except Exception:
        return {}
    return {k: c.get(k) for k in ("cpu_target", "cpu_targets", "build_flags", "openmp")
            if k in c}


def speed_table(quick: bool = True, file=None) -> List[dict]:
    """A short table of cbn against the NumPy reference (the ``python -m cbn`` main job).

    Float32, NCHW and channels-last, every op, cbn's default thread count; a few seconds
    in all with ``quick=True`` (the full CASES set otherwise).
    """
    out = file or sys.stdout
    n = cbn.get_num_threads()
    cases = [(16, 256, 14, 14), (256, 1024)] if quick else CASES
    min_time, min_repeat = (0.05, 5) if quick else (0.2, 7)
    print(f"\nspeed against the NumPy reference (float32, {n} thread(s) for cbn; "
          f"medians, per call; copy = np.copyto of the same array):", file=out)
    table = Table(["case", "layout", "op", "cbn", "numpy", "numpy/cbn", "cbn/copy"],
                  align="<<<>>>>", indent="  ", file=out,
                  widths=[max(len(case_name(c)) for c in cases), 6,
                          max(len(op) for op in OPS)] + [_TIME_WIDTH] * 4)
    table.header()
    rows = []
    for shape in cases:
        for layout in LAYOUTS:
            if not layout_applies(shape, layout):
                continue
            for op in OPS:
                r = measure_row(shape, "float32", layout, n, op,
                                impls=("copy", "cbn", "numpy"), min_time=min_time,
                                min_repeat=min_repeat, numpy_repeat=3)
                rows.append(r)
                m, q = r["median_s"], r["ratios"]
                table.row([r["case"], SHORT[layout], op, fmt_time(m.get("cbn")),
                           fmt_time(m.get("numpy")), fmt_ratio(q.get("numpy/cbn")),
                           fmt_ratio(q.get("cbn/copy"))])
    print("  (full comparison with PyTorch and ONNX Runtime: python -m cbn bench)", file=out)
    return rows


# --------------------------------------------------------------------------- chart

#: The chart's panels: (ratio key, y-axis label, log scale).
PLOT_METRICS = (
    ("torch/cbn", "torch / cbn\n(> 1: cbn faster)", True),
    ("numpy/cbn", "NumPy reference / cbn\n(> 1: cbn faster)", True),
    ("out/copy", "cbn out= / copy\n(copies of the input)", False),
)
#: Bars above this are cut there and labelled with their value.
PLOT_CAP = 100.0
_OP_COLOURS = {"train": "#1f77b4", "eval": "#ff7f0e", "backward": "#2ca02c",
               "train_fused": "#9467bd", "eval_fused": "#8c564b"}


def plot(doc: dict, path: str) -> None:
    """Draw the rows of a :func:`run` document (or its ``--json`` file) into ``path``.

    One panel per ratio (torch/cbn, numpy/cbn, cbn out=/copy) and thread count; along x
    the cases (shape, dtype, layout), one bar per op. Needs matplotlib (the ``plot``
    extra); uses its object API with the Agg canvas, so it neither needs a display nor
    changes pyplot's state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = doc["rows"]
    if not rows:
        raise ValueError("no rows to plot")
    threads = sorted({r["threads"] for r in rows})
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    groups = list(dict.fromkeys((r["case"], r["dtype"], r["layout"]) for r in rows))
    metrics = [m for m in PLOT_METRICS if any(m[0] in r["ratios"] for r in rows)]
    if not metrics:
        raise ValueError("the rows hold none of the ratios " +
                         ", ".join(m[0] for m in PLOT_METRICS))
    panels = [(m, t) for m in metrics for t in threads]
    width = max(8.0, 0.34 * len(groups) + 2.5)
    fig = Figure(figsize=(width, 2.4 * len(panels) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    index = {(r["case"], r["dtype"], r["layout"], r["threads"], r["op"]): r for r in rows}
    bar = 0.8 / len(ops)
    for ax, ((key, label, log), t) in zip(axes, panels):
        for k, op in enumerate(ops):
            xs, ys = [], []
            for i, (case, dtype, layout) in enumerate(groups):
                r = index.get((case, dtype, layout, t, op))
                v = r["ratios"].get(key) if r else None
                if v:
                    xs.append(i - 0.4 + bar * (k + 0.5))
                    ys.append(v)
            # A stalled peer (a thread team waiting for a core) can read 1000x: such bars
            # are cut at PLOT_CAP and labelled with their value, so the others stay legible.
            shown = [min(y, PLOT_CAP) for y in ys]
            ax.bar(xs, shown, bar, label=op, color=_OP_COLOURS.get(op))
            for x, y in zip(xs, ys):
                if y > PLOT_CAP:
                    ax.annotate(f"{y:.0f}", (x, PLOT_CAP), fontsize=6, rotation=90,
                                ha="center", va="top", color="white")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(f"{label}\n{t} thread{'s' if t > 1 else ''}", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(ncol=len(ops), fontsize=8, loc="upper right")
    short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}
    axes[-1].set_xticks(range(len(groups)))
    axes[-1].set_xticklabels([f"{c} {short.get(d, d)} {SHORT.get(lay, lay)}"
                              for c, d, lay in groups], rotation=60, ha="right", fontsize=7)
    axes[-1].set_xlim(-0.6, len(groups) - 0.4)
    meta = doc.get("meta", {})
    v = meta.get("versions", {})
    peers = ", ".join(f"{k} {v[k]}" for k in ("torch", "numpy") if v.get(k))
    fig.suptitle(f"cbn {v.get('cbn', '?')} against {peers}: {meta.get('cpu', '?')}, "
                 f"{meta.get('cpu_count', '?')} CPUs, {meta.get('date', '?')[:10]}\n"
                 "medians per call; first = channels-first (NCHW), last = channels-last "
                 "(NHWC)", fontsize=9)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- contention


def _busy_loop(stop: threading.Event) -> None:
    """Keep one core busy outside OpenMP until ``stop`` is set: np.sin over a
    cache-resident array, a C loop that holds the GIL only between calls."""
    a = np.linspace(0.0, 1.0, 16384)
    out = np.empty_like(a)
    while not stop.is_set():
        np.sin(a, out=out)


def start_busy_thread() -> threading.Event:
    """Start a daemon thread running :func:`_busy_loop`; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=_busy_loop, args=(stop,), name="cbn-bench-busy",
                     daemon=True).start()
    return stop


#: The contention target (issue 21): with N processes at once, each row's worst round
#: within CONTENTION_QUIET_BOUND of cbn alone on one thread, or within
#: CONTENTION_ONE_THREAD_BOUND of the same N processes forced to one thread; and within
#: CONTENTION_TORCH_BOUND of PyTorch in the same setup (where torch is installed).
CONTENTION_QUIET_BOUND = 3.0
CONTENTION_ONE_THREAD_BOUND = 1.3
CONTENTION_TORCH_BOUND = 1.5


def _contention_call(shape, layout, dtype, op, threads, impl="cbn"):
    """The callable of ``impl`` ("cbn" or "torch") for one contention row
    (``threads=None``: the library's default thread count)."""
    torch = None
    if impl == "torch":
        torch = _import_torch()
        if threads is not None:
            torch.set_num_threads(threads)
    fns, _ = _setup_row(shape, dtype, layout, threads, op, (impl,), torch, None)
    return fns[impl]


def _contention_worker(index, rows, dtype, threads, rounds, min_time, min_repeat, busy,
                       barrier, queue, impl="cbn"):
    """One process of the contention phase: for each row, ``rounds`` timed rounds of
    ``impl``, each started together with the other processes at ``barrier``. Puts
    ``(index, result)`` on ``queue``; ``result`` is a dict, or a string saying what
    failed."""
    stop = start_busy_thread() if busy else None
    try:
        out = []
        for shape, layout, op in rows:
            fn = _contention_call(shape, layout, dtype, op, threads, impl)
            _, _, number = _calibrate_together(fn, barrier)
            medians, times = [], []
            for _ in range(rounds):
                barrier.wait(timeout=600)
                res = measure({"cbn": fn}, min_time=min_time, min_repeat=min_repeat,
                              numbers={"cbn": number}, max_time=10 * min_time + 2.0)["cbn"]
                medians.append(res["median"])
                times.extend(res["times"])
            out.append({"median": statistics.median(times), "rounds": medians,
                        "samples": len(times), "number": number})
        if threads is not None:
            used = threads
        elif impl == "torch":
            used = _import_torch().get_num_threads()
        else:
            used = cbn.get_num_threads()
        queue.put((index, {"rows": out, "threads": used, "pid": os.getpid()}))
    except BaseException as e:  # report, and free the others waiting at the barrier
        barrier.abort()
        queue.put((index, f"{type(e).__name__}: {e}"))
    finally:
        if stop is not None:
            stop.set()


def _calibrate_together(fn, barrier):
    """:func:`cbn._timing.calibrate` started together with the other processes."""
    barrier.wait(timeout=600)
    return calibrate(fn)


def _contention_phase(processes, rows, dtype, threads, rounds, min_time, min_repeat,
                      busy_thread, emit, impl="cbn") -> Dict[int, dict]:
    """Start ``processes`` spawned workers (:func:`_contention_worker`) timing ``impl`` at
    ``threads`` and collect their results (raises RuntimeError naming the processes that
    failed)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_contention_worker,
                         args=(i, rows, dtype, threads, rounds, min_time, min_repeat,
                               busy_thread, barrier, queue, impl), daemon=True)
             for i in range(processes)]
    for p in procs:
        p.start()
    results: Dict[int, object] = {}
    try:
        while len(results) < processes:
            try:
                i, res = queue.get(timeout=5)
                results[i] = res
            except Exception:  # queue.Empty: check for a process that died silently
                dead = [p for k, p in enumerate(procs)
                        if k not in results and not p.is_alive()]
                if dead:
                    barrier.abort()
                    for k, p in enumerate(procs):
                        if k not in results and not p.is_alive():
                            results[k] = f"process exited with code {p.exitcode}"
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    errors = {i: r for i, r in results.items() if isinstance(r, str)}
    if errors:
        for i, msg in sorted(errors.items()):
            emit(f"process {i} failed: {msg}")
        raise RuntimeError("contention run failed: " + "; ".join(errors.values()))
    return results  # type: ignore[return-value]


def contention(processes: int = 2, *, cases=None, dtype="float32", ops=CONTENTION_OPS,
               threads=None, rounds: int = 3, min_time: float = 0.05, min_repeat: int = 3,
               busy_thread: bool = False, torch: Optional[bool] = None,
               file=None) -> dict:
    """cbn in ``processes`` processes at once, against cbn alone on one thread and against
    PyTorch in the same setup.

    Quiet phase first: this process times each row alone with ``n_threads=1`` (nothing
    else of this script runs). Then ``processes`` processes are started (``spawn``), each
    calling cbn with ``n_threads=threads`` (None: each process's default thread count)
    and, with ``busy_thread``, running :func:`_busy_loop` in a thread beside it. They time
    every row in ``rounds`` rounds, each round started together at a barrier and lasting
    ``min_time`` seconds and ``min_repeat`` samples at least. Prints, per row, the quiet
    median, each process's median per call over its rounds, the worst round (the largest
    round median of any process), and both as ratios to the quiet median; then the worst
    round again with every process forced to one thread ("1t worst"; the same phase when
    the processes ran on one thread already) and the worst round's ratio to it; then, with
    ``torch`` (None: if it imports), the same phase with every process calling
    ``torch.ops.aten.native_batch_norm`` (``_backward``) at ``threads`` (None: torch's
    default), its worst round ("torch worst") and cbn's worst against it. The last column
    says whether the row meets the contention target (CONTENTION_QUIET_BOUND,
    CONTENTION_ONE_THREAD_BOUND, CONTENTION_TORCH_BOUND). ``cases`` is a list of (NCHW
    shape, layout) with layout "channels_first" or "channels_last" (default
    CONTENTION_CASES). Returns the JSON document.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if torch is None:
        torch = _import_torch() is not None
    elif torch and _import_torch() is None:
        raise ValueError("torch=True, but torch does not import")
    cases = list(CONTENTION_CASES if cases is None else cases)
    rows = [(tuple(shape), layout, op) for shape, layout in cases for op in ops]
    out = file or sys.stdout
    emit = _Printer(out)
    v = _versions()
    itemsize = np.dtype(dtype).itemsize
    emit(f"cbn {v['cbn']} (OpenMP {'on' if cbn.openmp_enabled() else 'off'}), numpy "
         f"{v['numpy']}, Python {v['python']}; CPU: {_cpu_model()}, os.cpu_count() = "
         f"{os.cpu_count()}")
    emit(f"contention: {processes} process(es) (spawn), each cbn at n_threads="
         f"{'default' if threads is None else threads}"
         + (" plus one busy non-OpenMP thread" if busy_thread else "")
         + f"; {rounds} round(s) started together; {dtype}; times per call")
    emit("quiet = this process alone, n_threads=1, measured first; p<i> = median of "
         "process i over its rounds; worst = largest round median of any process; "
         "1t worst = the same with every process forced to n_threads=1"
         + ("; torch worst = the same with every process calling torch at n_threads="
            + ("its default" if threads is None else str(threads)) if torch else "")
         + f"; target: (worst/quiet <= {CONTENTION_QUIET_BOUND:g} or worst/1t <= "
         f"{CONTENTION_ONE_THREAD_BOUND:g})"
         + (f" and worst/torch <= {CONTENTION_TORCH_BOUND:g}" if torch else ""))
    emit("")

    quiet = []
    for shape, layout, op in rows:
        fn = _contention_call(shape, layout, dtype, op, 1)
        quiet.append(measure({"cbn": fn}, min_time=min_time, min_repeat=max(min_repeat, 5))
                     ["cbn"]["median"])
        del fn

    results = _contention_phase(processes, rows, dtype, threads, rounds, min_time,
                                min_repeat, busy_thread, emit)
    worker_threads = sorted({results[i]["threads"] for i in range(processes)})
    # The same N processes, each forced to one thread: what a careful user would pick.
    one = (results if worker_threads == [1] else
           _contention_phase(processes, rows, dtype, 1, rounds, min_time, min_repeat,
                             busy_thread, emit))
    theirs = (_contention_phase(processes, rows, dtype, threads, rounds, min_time,
                                min_repeat, busy_thread, emit, impl="torch")
              if torch else None)

    titles = (["case", "layout", "MB", "op", "quiet"] + [f"p{i}" for i in range(processes)]
              + ["worst", "1t worst"] + (["torch worst"] if torch else [])
              + ["p/quiet", "worst/quiet", "worst/1t"] + (["worst/torch"] if torch else [])
              + ["target"])
    ntimes = len(titles) - 4        # quiet and after
    table = Table(titles, align=["<", "<", ">", "<"] + [">"] * ntimes,
                  widths=[max(len(case_name(s)) for s, _, _ in rows), 6, 5,
                          max(len(op) for op in ops)]
                  + [_TIME_WIDTH] * (ntimes - 1) + [6],
                  file=out)
    before = list(emit.lines)
    table.header()
    doc_rows = []
    for k, (shape, layout, op) in enumerate(rows):
        per = [results[i]["rows"][k] for i in range(processes)]
        medians = [p["median"] for p in per]
        worst = max(max(p["rounds"]) for p in per)
        worst1 = max(max(one[i]["rows"][k]["rounds"]) for i in range(processes))
        worst_t = (max(max(theirs[i]["rows"][k]["rounds"]) for i in range(processes))
                   if theirs is not None else None)
        ratio, worst_ratio = max(medians) / quiet[k], worst / quiet[k]
        met = ((worst_ratio <= CONTENTION_QUIET_BOUND
                or worst / worst1 <= CONTENTION_ONE_THREAD_BOUND)
               and (worst_t is None or worst / worst_t <= CONTENTION_TORCH_BOUND))
        mb = math.prod(shape) * itemsize / 1e6
        table.row([case_name(shape), SHORT.get(layout, layout), f"{mb:.1f}", op,
                   fmt_time(quiet[k])]
                  + [fmt_time(m) for m in medians]
                  + [fmt_time(worst), fmt_time(worst1)]
                  + ([fmt_time(worst_t)] if torch else [])
                  + [fmt_ratio(ratio), fmt_ratio(worst_ratio), fmt_ratio(worst / worst1)]
                  + ([fmt_ratio(worst / worst_t)] if torch else [])
                  + ["ok" if met else "miss"])
        doc_rows.append({"case": case_name(shape), "shape": list(shape), "layout": layout,
                         "op": op, "dtype": dtype, "megabytes": mb, "quiet_s": quiet[k],
                         "median_s": medians, "rounds_s": [p["rounds"] for p in per],
                         "samples": [p["samples"] for p in per], "worst_s": worst,
                         "ratio": ratio, "worst_ratio": worst_ratio,
                         "one_thread_worst_s": worst1, "worst_vs_one_thread": worst / worst1,
                         "torch_worst_s": worst_t,
                         "worst_vs_torch": None if worst_t is None else worst / worst_t,
                         "target_met": met})
    emit.lines = []
    emit("")
    top = max(doc_rows, key=lambda r: r["ratio"])
    top_worst = max(doc_rows, key=lambda r: r["worst_ratio"])
    emit(f"largest p/quiet: {fmt_ratio(top['ratio'])} ({top['case']} {SHORT[top['layout']]} "
         f"{top['op']}); largest worst/quiet: {fmt_ratio(top_worst['worst_ratio'])} "
         f"({top_worst['case']} {SHORT[top_worst['layout']]} {top_worst['op']}); "
         f"process thread count(s): {', '.join(map(str, worker_threads))}")
    missed = [r for r in doc_rows if not r["target_met"]]
    emit(f"contention target met on {len(doc_rows) - len(missed)} of {len(doc_rows)} rows"
         + (": missed on " + ", ".join(f"{r['case']} {SHORT[r['layout']]} {r['op']}"
                                       for r in missed) if missed else ""))
    return {
        "meta": {
            "versions": v, "openmp": cbn.openmp_enabled(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {"processes": processes, "threads": threads,
                         "worker_threads": worker_threads, "busy_thread": busy_thread,
                         "torch": bool(torch),
                         "torch_threads": (sorted({theirs[i]["threads"]
                                                   for i in range(processes)})
                                           if theirs is not None else None),
                         "rounds": rounds, "min_time": min_time, "min_repeat": min_repeat,
                         "dtype": dtype},
            "notes": {"quiet_s": "one process alone, n_threads=1, measured first",
                      "median_s": "per process: median per call over all its rounds",
                      "worst_s": "largest round median of any process",
                      "ratio": "largest process median / quiet",
                      "worst_ratio": "worst / quiet",
                      "one_thread_worst_s": "worst, with every process forced to one "
                                            "thread (n_threads=1)",
                      "worst_vs_one_thread": "worst / one_thread_worst_s",
                      "torch_worst_s": "worst, with every process calling torch instead "
                                       "(null without torch)",
                      "worst_vs_torch": "worst / torch_worst_s",
                      "target_met": "(worst_ratio <= 3 or worst_vs_one_thread <= 1.3) "
                                    "and worst_vs_torch <= 1.5"},
        },
        "rows": doc_rows,
        "table": "\n".join(before + table.render() + emit.lines),
    }


# --------------------------------------------------------------------------- command line


def _split(values, conv=str):
    out = []
    for v in values or []:
        out.extend(conv(p) for p in str(v).split(",") if p.strip())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cbn bench",
        description="Time cbn against a plain copy (the memory-bandwidth floor), the NumPy "
                    "reference, PyTorch (native_batch_norm) and ONNX Runtime where they "
                    "import, in one process with the same thread count for all. With "
                    "--processes N: cbn in N processes at once against cbn alone on one "
                    "thread (contention mode).")
    p.add_argument("--case", action="append", metavar="SHAPE",
                   help="e.g. 32x64x56x56 (repeatable or comma-separated; NCHW order), or "
                        "the name of a case set: resnet50 (the input shapes of ResNet-50's "
                        "53 BatchNorm2d layers at batch 16, with their time summed over "
                        "the 53 layers). Default: " + ", ".join(case_name(c) for c in CASES)
                        + "; with --quick: " + ", ".join(case_name(c) for c in QUICK_CASES)
                        + "; with --processes: " + ", ".join(
                            f"{case_name(c)} {lay}" for c, lay in CONTENTION_CASES))
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="float32 and/or float64 (default: both; with --quick or "
                        "--processes: float32); also float16 and bfloat16 (ml_dtypes), "
                        "computed in float32")
    p.add_argument("--layout", action="append", metavar="LAYOUT",
                   help="channels_first (NCHW, axis=1) and/or channels_last (the same "
                        "logical shape stored as NHWC, axis=-1); nchw, nhwc, "
                        "channels-first, channels-last are accepted too. Default: both; "
                        "2D cases have one layout (channels_first)")
    p.add_argument("--threads", action="append", metavar="N",
                   help="thread counts, e.g. --threads 1,2 (default: 1 and 2; with --quick: "
                        "1). With --processes: one count for every process (default: "
                        "cbn's default thread count in each)")
    p.add_argument("--op", action="append", metavar="OP",
                   help="train (training forward), eval (eval forward), backward "
                        "(training-mode backward), train_fused, eval_fused (relu(bn(x) + "
                        "residual)); default: all five; with --processes: train, eval, "
                        "backward")
    p.add_argument("--impl", action="append", metavar="NAME",
                   help="subset of " + ",".join(IMPLS) + " (default: all that import); "
                        "with --processes: cbn,torch (default: torch too if it imports)")
    p.add_argument("--repeat", type=int, default=None,
                   help="minimum number of samples per implementation (default 7; with "
                        "--quick: 3; with --processes: 3 per round)")
    p.add_argument("--min-time", type=float, default=None,
                   help="minimum seconds of samples per implementation and row "
                        "(default 0.2; with --quick 0.02; with --processes 0.05 per round)")
    p.add_argument("--numpy-repeat", type=int, default=3,
                   help="samples of the NumPy reference when one call takes > 5 ms (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="few repeats and a small subset (cases " +
                        ", ".join(case_name(c) for c in QUICK_CASES) +
                        "; float32; 1 thread) unless filters say otherwise")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="contention mode: N processes (spawned) each time cbn on the same "
                        "shapes at once, after a quiet phase that times cbn alone on one "
                        "thread; prints medians per process, the worst round and the "
                        "ratios to the quiet phase (default: off)")
    p.add_argument("--rounds", type=int, default=3,
                   help="contention mode: rounds per row, started together (default 3)")
    p.add_argument("--busy-thread", action="store_true",
                   help="contention mode: each process also runs one thread that keeps a "
                        "core busy outside OpenMP (NumPy's sin in a loop; default: off). "
                        "--processes 1 --busy-thread measures cbn beside one busy thread")
    p.add_argument("--sync-ranks", metavar="N,M", default=None,
                   help="SyncBatchNorm mode: for each rank count, run `mpiexec -n N python -m "
                        "cbn.distributed` (needs mpi4py and mpiexec: pip install 'cbn[mpi]') "
                        "and print SyncBatchNorm's overhead over BatchNorm per rank; --case "
                        "sets the per-rank shape (default 32x64x28x28)")
    p.add_argument("--json", metavar="FILE", help="also write rows and metadata as JSON")
    p.add_argument("--plot", metavar="FILE",
                   help="also draw the chart (PNG, SVG or PDF by the name; needs matplotlib: "
                        "pip install 'cbn[plot]'): per case, torch/cbn and numpy/cbn "
                        "(> 1: cbn faster) and cbn's time in copies of the input")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: read a --json file of an earlier run (and draw "
                        "it with --plot)")
    p.add_argument("--wide", action="store_true",
                   help="every time (copy, cbn, cbn out=, torch, ort, numpy) and every ratio "
                        "in the table; the default table fits 100 columns (cbn, torch, "
                        "torch/cbn, numpy/cbn, out/copy) and --json keeps everything")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (default: row i of N, time elapsed and left; "
                        "on a terminal after every row, else every 15 s)")
    return p


def _sync_main(ranks: str, cases, repeat: Optional[int]) -> int:
    """--sync-ranks: SyncBatchNorm's overhead at each rank count, under mpiexec."""
    import shutil
    import subprocess
    try:
        counts = [int(v) for v in ranks.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 1 for n in counts):
        print("--sync-ranks takes rank counts >= 1, e.g. 2,4", file=sys.stderr)
        return 2
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        print("--sync-ranks needs mpiexec (pip install 'cbn[mpi]')", file=sys.stderr)
        return 2
    shape = case_name(cases[0]) if cases else "32x64x28x28"
    extra = ["--repeat", str(repeat)] if repeat else []
    for n in counts:
        cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "cbn.distributed",
               "--shape", shape] + extra
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
    return 0


def _contention_main(args, cases, dtypes, layouts, threads, ops, impls) -> int:
    if args.processes < 1:
        print("--processes must be >= 1", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("--rounds must be >= 1", file=sys.stderr)
        return 2
    if len(dtypes) > 1 or len(threads) > 1:
        print("with --processes, give one --dtype and at most one --threads",
              file=sys.stderr)
        return 2
    bad = [op for op in ops if op not in CONTENTION_OPS]
    if bad:
        print(f"with --processes, --op takes {', '.join(CONTENTION_OPS)}", file=sys.stderr)
        return 2
    if cases is None:
        pairs = [(c, lay) for c, lay in CONTENTION_CASES
                 if layouts is None or len(c) == 2 or lay in layouts]
    else:
        pairs = [(c, "channels_first") if len(c) == 2 else (c, lay)
                 for c in cases for lay in (layouts or LAYOUTS)]
        pairs = list(dict.fromkeys(pairs))
    bad = [i for i in impls if i not in ("cbn", "torch")]
    if args.impl and (bad or "cbn" not in impls):
        print("with --processes, --impl takes cbn (always timed) and torch", file=sys.stderr)
        return 2
    # torch: timed if it imports, unless --impl leaves it out; named and missing: an error.
    torch = None if not args.impl else "torch" in impls
    if torch and _import_torch() is None:
        print("--impl torch: torch does not import", file=sys.stderr)
        return 2
    min_repeat = args.repeat if args.repeat is not None else 3
    min_time = args.min_time if args.min_time is not None else 0.05
    doc = contention(args.processes, cases=pairs, dtype=(dtypes or ["float32"])[0],
                     ops=ops or CONTENTION_OPS, threads=threads[0] if threads else None,
                     rounds=args.rounds, min_time=min_time, min_repeat=max(1, min_repeat),
                     busy_thread=args.busy_thread, torch=torch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _expand_cases(values):
    """(shapes, {shape: layers} of a named set or None, the set's name or None)."""
    shapes, layers, name = [], None, None
    for text in _split(values):
        key = text.strip().lower()
        if key in CASE_SETS:
            layers = dict(CASE_SETS[key]) if layers is None else {**layers, **CASE_SETS[key]}
            name = key if name is None else f"{name}+{key}"
            shapes.extend(CASE_SETS[key])
        else:
            shapes.append(_parse_case(text))
    return list(dict.fromkeys(shapes)), layers, name


def _write_plot(doc, path) -> int:
    try:
        plot(doc, path)
    except ImportError as e:
        print(f"--plot needs matplotlib (pip install 'cbn[plot]'): {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        if not args.plot:
            print(doc.get("table", ""))
            return 0
        return _write_plot(doc, args.plot)
    q = args.quick
    try:
        given_cases, layers, set_name = _expand_cases(args.case)
    except argparse.ArgumentTypeError as e:
        print(e, file=sys.stderr)
        return 2
    for c in given_cases:
        if not 2 <= len(c) <= 5 or any(s < 1 for s in c):
            print(f"bad case {case_name(c)}: 2 to 5 positive sizes expected", file=sys.stderr)
            return 2
    try:
        given_layouts = list(dict.fromkeys(parse_layout(v) for v in _split(args.layout)))
    except ValueError as e:
        print(f"--layout: {e}", file=sys.stderr)
        return 2
    try:
        given_threads = _split(args.threads, int)
    except ValueError:
        print("--threads takes integers", file=sys.stderr)
        return 2
    if any(t < 1 for t in given_threads):
        print("--threads must be >= 1", file=sys.stderr)
        return 2
    given_dtypes, given_ops = _split(args.dtype), _split(args.op)
    impls = _split(args.impl) or list(IMPLS)
    for flag, given, allowed in (("--dtype", given_dtypes, DTYPES + HALF_DTYPES),
                                 ("--op", given_ops, OPS), ("--impl", impls, IMPLS)):
        unknown = [v for v in given if v not in allowed]
        if unknown:
            print(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(allowed)}",
                  file=sys.stderr)
            return 2
    for d in given_dtypes:
        if not _dtype_available(d):
            print(f"--dtype {d} needs ml_dtypes (pip install ml_dtypes)", file=sys.stderr)
            return 2
    if args.plot and args.processes is None and args.sync_ranks is None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib (pip install 'cbn[plot]')", file=sys.stderr)
            return 2
    if args.sync_ranks is not None:
        return _sync_main(args.sync_ranks, given_cases, args.repeat)
    if args.processes is not None:
        return _contention_main(args, given_cases or None, given_dtypes,
                                given_layouts or None, given_threads, given_ops,
                                _split(args.impl))
    cases = given_cases or (QUICK_CASES if q else CASES)
    dtypes = given_dtypes or (["float32"] if q else list(DTYPES))
    layouts = given_layouts or list(LAYOUTS)
    threads = given_threads or ([1] if q else [1, 2])
    ops = given_ops or list(OPS)
    min_repeat = args.repeat if args.repeat is not None else (3 if q else 7)
    min_time = args.min_time if args.min_time is not None else (0.02 if q else 0.2)
    doc = run(cases, dtypes, layouts, threads, ops, impls, min_time=min_time,
              min_repeat=max(1, min_repeat), numpy_repeat=max(1, args.numpy_repeat),
              wide=args.wide, progress=not args.no_progress, layers=layers,
              set_name=set_name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        return _write_plot(doc, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
