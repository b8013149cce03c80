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
``cbn_out``  forward only: the same call writing into a preallocated ``out=``, which is
             the figure to hold against ``copy`` (neither allocates).
``torch``    ``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward`` on tensors
             sharing the NumPy arrays' memory (channels-last: the NHWC array permuted to
             NCHW, i.e. PyTorch's channels_last memory format), ``torch.set_num_threads``.
``ort``      eval forward, NCHW only: ONNX Runtime's BatchNormalization in a one-node model
             built with ``onnx.helper`` (``intra_op_num_threads``, spinning off).
``numpy``    :mod:`cbn._reference`, plain NumPy in float64: the baseline the asv suite
             tracks. Slow on big inputs, so it is timed with fewer repeats there.

The NumPy reference and the copy are single-threaded whatever the row's thread count.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import cbn
from cbn import _reference

__all__ = ["main", "speed_table", "run", "CASES", "QUICK_CASES"]

#: Shapes in NCHW order (channels second). Channels-last rows use the same logical shape
#: stored as (N, *spatial, C) with ``axis=-1``; 2D shapes have a single layout.
CASES: List[tuple] = [
    (32, 64, 56, 56),
    (64, 128, 28, 28),
    (16, 256, 14, 14),
    (8, 3, 224, 224),
    (256, 1024),
    (4, 32, 16, 32, 32),
    (8, 16),          # per-call overhead
    (2, 8, 4, 4),     # per-call overhead
]
QUICK_CASES: List[tuple] = [(16, 256, 14, 14), (256, 1024), (2, 8, 4, 4)]

DTYPES = ("float32", "float64")
LAYOUTS = ("nchw", "nhwc")
OPS = ("train", "eval", "backward", "train_fused", "eval_fused")
IMPLS = ("copy", "cbn", "cbn_out", "torch", "ort", "numpy")
OP_TITLES = {"train": "training forward", "eval": "eval forward",
             "backward": "backward (training)",
             "train_fused": "training forward, relu(bn(x) + residual)",
             "eval_fused": "eval forward, relu(bn(x) + residual)"}

EPS = 1e-5
MOMENTUM = 0.1

#: One timed sample runs a callable this long at least (several calls for tiny inputs), so
#: the resolution of the clock and the loop overhead do not matter.
SAMPLE_TIME = 2e-4
#: A slow NumPy call (above this many seconds) is timed only ``numpy_repeat`` times.
SLOW_CALL = 5e-3
#: Upper bound on the samples of one implementation in one measurement.
MAX_SAMPLES = 2000


def case_name(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _parse_case(text: str) -> tuple:
    parts = text.lower().replace(",", "x").replace("(", "").replace(")", "").split("x")
    try:
        return tuple(int(p) for p in parts if p.strip())
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


# --------------------------------------------------------------------------- timing


def measure(fns: Dict[str, Callable[[], object]], *, min_time: float = 0.2,
            min_repeat: int = 7, caps: Optional[Dict[str, int]] = None,
            slow_caps: Optional[Dict[str, tuple]] = None,
            max_time: Optional[float] = None, settle: float = 0.0,
            block_time: float = 0.0) -> Dict[str, dict]:
    """Median time of one call of each callable, interleaved round by round.

    Each callable is called once to warm up (its result is returned as ``result``) and once
    more to calibrate how many calls make one sample (>= SAMPLE_TIME). Then, round after
    round, every callable that still needs samples is timed once, in the order of ``fns``.
    A callable needs samples until it has ``min_repeat`` of them and ``min_time`` seconds
    in all, or reaches its cap (``caps[name]``, or MAX_SAMPLES; ``slow_caps[name] =
    (seconds, cap)`` applies ``cap`` when the calibration call took longer than ``seconds``).
    ``max_time`` (default
    20 * min_time + 5 s) bounds the loop as a whole once every callable has 3 samples.

    With ``settle`` > 0 a round gives each callable a block instead of one sample: sleep
    ``settle`` seconds, one untimed call (unless the callable is slow), then samples for
    ``block_time`` seconds. That is for rows where two OpenMP runtimes share the process
    (cbn's and PyTorch's, each with several threads): the worker threads of one spin for
    milliseconds after each parallel region and would steal the cores the other's team
    needs, so fine interleaving would measure that interference rather than the kernels.
    """
    caps = dict(caps or {})
    if max_time is None:
        max_time = 20 * min_time + 5.0
    state: Dict[str, dict] = {}
    for name, fn in fns.items():
        result = fn()
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        number = max(1, min(10000, int(math.ceil(SAMPLE_TIME / max(once, 1e-9)))))
        cap = caps.get(name, MAX_SAMPLES)
        if slow_caps and name in slow_caps and once > slow_caps[name][0]:
            cap = min(cap, slow_caps[name][1])
        state[name] = {"result": result, "first": once, "number": number, "samples": [],
                       "cap": max(1, min(cap, MAX_SAMPLES))}

    def needs(s):
        n = len(s["samples"])
        if n >= s["cap"]:
            return False
        return n < min_repeat or sum(s["samples"]) < min_time

    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        while True:
            active = [(name, s) for name, s in state.items() if needs(s)]
            if not active:
                break
            if (time.perf_counter() - start > max_time
                    and all(len(s["samples"]) >= min(3, s["cap"]) for s in state.values())):
                break
            for name, s in active:
                fn, number = fns[name], s["number"]
                if settle > 0:
                    time.sleep(settle)
                    if s["first"] < SLOW_CALL:
                        fn()
                block_start = time.perf_counter()
                while True:
                    if number == 1:
                        t0 = time.perf_counter()
                        fn()
                        s["samples"].append(time.perf_counter() - t0)
                    else:
                        t0 = time.perf_counter()
                        for _ in range(number):
                            fn()
                        s["samples"].append((time.perf_counter() - t0) / number)
                    if (settle <= 0 or not needs(s)
                            or time.perf_counter() - block_start >= block_time):
                        break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median": statistics.median(s["samples"]), "min": min(s["samples"]),
                   "samples": len(s["samples"]), "number": s["number"], "result": s["result"]}
            for name, s in state.items()}


# --------------------------------------------------------------------------- one row


def _array_shape(shape, layout):
    if layout == "nhwc":
        return (shape[0],) + tuple(shape[2:]) + (shape[1],), -1
    return tuple(shape), 1


def _to_torch_view(torch, a, layout):
    """A tensor sharing ``a``'s memory with NCHW logical shape (channels_last if NHWC)."""
    t = torch.from_numpy(a)
    if layout == "nhwc":
        nd = a.ndim
        t = t.permute(0, nd - 1, *range(1, nd - 1))
    return t


def _from_torch_view(t, layout):
    if layout == "nhwc":
        nd = t.dim()
        t = t.permute(0, *range(2, nd), 1)
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
    """Callables for one row, in the order they are interleaved."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    ashape, axis = _array_shape(shape, layout)
    C = shape[1]
    x = rng.standard_normal(ashape, dtype=dtype)
    x *= 2
    x += 0.5
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm0 = (0.1 * rng.standard_normal(C)).astype(dtype)
    rv0 = rng.uniform(0.5, 2.0, C).astype(dtype)
    buf = np.empty_like(x)
    training = op not in ("eval", "eval_fused")
    # The fused ops add a residual and a ReLU: cbn does it in its one output pass; torch
    # and NumPy, which have no such fusion on the CPU, do it as two more element-wise ops.
    fused = op.endswith("_fused")
    r = rng.standard_normal(ashape, dtype=dtype) if fused else None
    extra = {"activation": "relu", "residual": r} if fused else {}
    fns: Dict[str, Callable] = {}
    notes = {}

    if "copy" in impls:
        fns["copy"] = lambda: np.copyto(buf, x)

    if op == "backward":
        g = rng.standard_normal(ashape, dtype=dtype)
        _, sm, si = cbn.batch_norm_forward(x, w, b, None, None, True, MOMENTUM, EPS, axis=axis)
        if "cbn" in impls:
            fns["cbn"] = lambda: cbn.batch_norm_backward(g, x, w, sm, si, True, axis=axis,
                                                         n_threads=threads)[0]
        if "torch" in impls and torch is not None:
            tg, tx = _to_torch_view(torch, g, layout), _to_torch_view(torch, x, layout)
            tw, tsm, tsi = (torch.from_numpy(a.copy()) for a in (w, sm, si))
            trm, trv = torch.from_numpy(rm0.copy()), torch.from_numpy(rv0.copy())
            nbb = torch.ops.aten.native_batch_norm_backward
            mask = [True, True, True]
            fns["torch"] = _first_call_copies(
                lambda: _from_torch_view(
                    nbb(tg, tx, tw, trm, trv, tsm, tsi, True, EPS, mask)[0], layout),
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
        fns["torch"] = _first_call_copies(lambda: _from_torch_view(timed(), layout), timed)
    if "ort" in impls and ort is not None and op == "eval":
        if layout == "nhwc" and len(shape) > 2:
            notes["ort"] = "ONNX BatchNormalization is channels-first only"
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
    tol = 2e-3 if np.dtype(dtype) == np.float32 else 1e-9
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    bad = []
    for name, r in results.items():
        got = r.get("result")
        if name in ("copy", "cbn") or not isinstance(got, np.ndarray):
            continue
        if got.shape != ref.shape or (ref.size and
                                      float(np.max(np.abs(got - ref))) > tol * scale):
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
        "layout": layout, "axis": 1 if layout == "nchw" else -1, "threads": threads, "op": op,
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


def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f}us"
    if t < 1.0:
        return f"{t * 1e3:.3g}ms" if t >= 0.1 else f"{t * 1e3:.2f}ms"
    return f"{t:.3g}s"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}" if r < 100 else f"{r:.0f}"


RATIO_KEYS = ("cbn/copy", "out/copy", "torch/cbn", "ort/cbn", "numpy/cbn")


class Table:
    """Prints rows as they come, with the columns of the implementations in use."""

    def __init__(self, impls, ratio_keys=RATIO_KEYS, file=None):
        self.impls = [i for i in IMPLS if i in impls]
        wanted = {"cbn/copy": ("cbn", "copy"), "out/copy": ("cbn_out", "copy"),
                  "torch/cbn": ("torch", "cbn"), "ort/cbn": ("ort", "cbn"),
                  "numpy/cbn": ("numpy", "cbn")}
        self.ratio_keys = [k for k in ratio_keys if all(i in self.impls for i in wanted[k])]
        self.file = file or sys.stdout
        self.lines: List[str] = []
        self.head = (f"{'case':<15} {'dtype':<7} {'layout':<6} {'thr':>3} {'op':<8} "
                     + " ".join(f"{i.replace('cbn_out', 'cbn out='):>9}" for i in self.impls)
                     + "  " + " ".join(f"{k:>9}" for k in self.ratio_keys))

    def emit(self, line=""):
        self.lines.append(line)
        print(line, file=self.file, flush=True)

    def header(self):
        self.emit(self.head)
        self.emit("-" * len(self.head))

    def row(self, r):
        cells = [fmt_time(r["median_s"].get(i)) for i in self.impls]
        ratios = [fmt_ratio(r["ratios"].get(k)) for k in self.ratio_keys]
        line = (f"{r['case']:<15} {r['dtype']:<7} {r['layout']:<6} {r['threads']:>3} "
                f"{r['op']:<8} " + " ".join(f"{c:>9}" for c in cells)
                + "  " + " ".join(f"{c:>9}" for c in ratios))
        if r.get("mismatch"):
            line += "  MISMATCH: " + ",".join(r["mismatch"])
        self.emit(line)


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
    peers = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime") if v.get(k))
    return [
        f"cbn {v['cbn']} (OpenMP {'on' if cbn.openmp_enabled() else 'off'}), numpy "
        f"{v['numpy']}, Python {v['python']}" + (f", {peers}" if peers else ""),
        f"CPU: {_cpu_model()}, os.cpu_count() = {os.cpu_count()}; threads per row: "
        f"{', '.join(map(str, threads_list))} (numpy reference and copy: 1)",
        "medians of interleaved rounds; times are per call; copy = np.copyto into a "
        "preallocated array of the input's size",
    ]


# --------------------------------------------------------------------------- driver


def run(cases=None, dtypes=DTYPES, layouts=LAYOUTS, threads=(1, 2), ops=OPS, impls=IMPLS,
        min_time=0.2, min_repeat=7, numpy_repeat=3, file=None) -> dict:
    """Measure every combination; print the table as it goes. Returns the JSON document."""
    cases = list(CASES if cases is None else cases)
    torch = _import_torch() if "torch" in impls else None
    ort = _import_ort() if "ort" in impls else None
    used = [i for i in impls if (i != "torch" or torch is not None)
            and (i != "ort" or (ort is not None and "eval" in ops))]
    out = file or sys.stdout
    table = Table(used, file=out)
    for line in describe_environment(threads):
        table.emit(line)
    missing = [name for name, mod in (("torch", torch), ("onnxruntime", ort))
               if name.replace("onnxruntime", "ort") in impls and mod is None]
    if missing:
        table.emit("not importable, skipped: " + ", ".join(missing))
    table.emit("")
    table.header()
    torch_threads = torch.get_num_threads() if torch is not None else None
    rows = []
    try:
        for shape in cases:
            for dtype in dtypes:
                for layout in layouts:
                    if layout == "nhwc" and len(shape) == 2:
                        continue  # (N, C): channels-last is the same array
                    for n in threads:
                        for op in ops:
                            r = measure_row(shape, dtype, layout, n, op, impls=used,
                                            torch=torch, ort=ort, min_time=min_time,
                                            min_repeat=min_repeat, numpy_repeat=numpy_repeat)
                            rows.append(r)
                            table.row(r)
    finally:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
    table.emit("")
    summary = {}
    for key, title in (("torch/cbn", "torch/cbn (> 1: cbn faster)"),
                       ("ort/cbn", "ort/cbn (> 1: cbn faster)"),
                       ("numpy/cbn", "numpy/cbn"), ("cbn/copy", "cbn/copy"),
                       ("out/copy", "cbn out=/copy")):
        g = geomeans(rows, key)
        if not g:
            continue
        summary[key] = g
        table.emit(f"geometric mean {title}: " + ", ".join(
            f"{op} {v['geomean']:.2f} ({v['rows']} rows, {v['min']:.2f}..{v['max']:.2f})"
            for op, v in g.items()))
    return {
        "meta": {
            "versions": _versions(), "openmp": cbn.openmp_enabled(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {"min_time": min_time, "min_repeat": min_repeat,
                         "numpy_repeat": numpy_repeat, "eps": EPS, "momentum": MOMENTUM},
            "notes": {"copy": "np.copyto(preallocated, x): the memory-bandwidth floor",
                      "cbn_out": "cbn forward writing into a preallocated out=",
                      "ratios": "ratios of medians; torch/cbn > 1 means cbn is faster"},
        },
        "rows": rows,
        "geomean": summary,
        "table": "\n".join(table.lines),
    }


def speed_table(quick: bool = True, file=None) -> List[dict]:
    """A short table of cbn against the NumPy reference (the ``python -m cbn`` main job).

    Float32, NCHW and channels-last, the three ops, cbn's default thread count; a few
    seconds in all with ``quick=True`` (the full CASES set otherwise).
    """
    out = file or sys.stdout
    n = cbn.get_num_threads()
    cases = [(16, 256, 14, 14), (256, 1024)] if quick else CASES
    min_time, min_repeat = (0.05, 5) if quick else (0.2, 7)
    print(f"\nspeed against the NumPy reference (float32, {n} thread(s) for cbn; "
          f"medians, per call; copy = np.copyto of the same array):", file=out)
    head = (f"  {'case':<15} {'layout':<6} {'op':<8} {'cbn':>9} {'numpy':>9} "
            f"{'numpy/cbn':>9} {'cbn/copy':>9}")
    print(head, file=out)
    rows = []
    for shape in cases:
        for layout in LAYOUTS:
            if layout == "nhwc" and len(shape) == 2:
                continue
            for op in OPS:
                r = measure_row(shape, "float32", layout, n, op,
                                impls=("copy", "cbn", "numpy"), min_time=min_time,
                                min_repeat=min_repeat, numpy_repeat=3)
                rows.append(r)
                m, q = r["median_s"], r["ratios"]
                print(f"  {r['case']:<15} {layout:<6} {op:<8} {fmt_time(m.get('cbn')):>9} "
                      f"{fmt_time(m.get('numpy')):>9} {fmt_ratio(q.get('numpy/cbn')):>9} "
                      f"{fmt_ratio(q.get('cbn/copy')):>9}", file=out, flush=True)
    print("  (full comparison with PyTorch and ONNX Runtime: python -m cbn bench)", file=out)
    return rows


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
                    "import, in one process with the same thread count for all.")
    p.add_argument("--case", action="append", metavar="SHAPE",
                   help="e.g. 32x64x56x56 (repeatable or comma-separated; NCHW order). "
                        "Default: " + ", ".join(case_name(c) for c in CASES))
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="float32 and/or float64 (default: both)")
    p.add_argument("--layout", action="append", metavar="LAYOUT",
                   help="nchw (axis=1) and/or nhwc (channels-last, axis=-1; 'channels-last' "
                        "is accepted too). Default: both")
    p.add_argument("--threads", action="append", metavar="N",
                   help="thread counts, e.g. --threads 1,2 (default: 1 and 2)")
    p.add_argument("--op", action="append", metavar="OP",
                   help="train (training forward), eval (eval forward), backward "
                        "(training-mode backward), train_fused and eval_fused "
                        "(relu(bn(x) + residual)); default: all five")
    p.add_argument("--impl", action="append", metavar="NAME",
                   help="subset of " + ",".join(IMPLS) + " (default: all available)")
    p.add_argument("--repeat", type=int, default=None,
                   help="minimum number of samples per implementation (default 7; quick 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="minimum seconds of samples per implementation and row "
                        "(default 0.2; quick 0.02)")
    p.add_argument("--numpy-repeat", type=int, default=3,
                   help="samples of the NumPy reference when one call takes > 5 ms (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="few repeats and a small subset (cases " +
                        ", ".join(case_name(c) for c in QUICK_CASES) +
                        "; float32; 1 thread) unless filters say otherwise")
    p.add_argument("--json", metavar="FILE", help="also write rows and metadata as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    q = args.quick
    cases = [_parse_case(c) for c in _split(args.case)] or (QUICK_CASES if q else CASES)
    for c in cases:
        if not 2 <= len(c) <= 5 or any(s < 1 for s in c):
            print(f"bad case {case_name(c)}: 2 to 5 positive sizes expected", file=sys.stderr)
            return 2
    dtypes = _split(args.dtype) or (["float32"] if q else list(DTYPES))
    layouts = [("nhwc" if v == "channels-last" else v) for v in _split(args.layout)] \
        or list(LAYOUTS)
    try:
        threads = _split(args.threads, int) or ([1] if q else [1, 2])
    except ValueError:
        print("--threads takes integers", file=sys.stderr)
        return 2
    if any(t < 1 for t in threads):
        print("--threads must be >= 1", file=sys.stderr)
        return 2
    ops = _split(args.op) or list(OPS)
    impls = _split(args.impl) or list(IMPLS)
    for flag, given, allowed in (("--dtype", dtypes, DTYPES), ("--layout", layouts, LAYOUTS),
                                 ("--op", ops, OPS), ("--impl", impls, IMPLS)):
        unknown = [v for v in given if v not in allowed]
        if unknown:
            print(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(allowed)}",
                  file=sys.stderr)
            return 2
    min_repeat = args.repeat if args.repeat is not None else (3 if q else 7)
    min_time = args.min_time if args.min_time is not None else (0.02 if q else 0.2)
    doc = run(cases, dtypes, layouts, threads, ops, impls, min_time=min_time,
              min_repeat=max(1, min_repeat), numpy_repeat=max(1, args.numpy_repeat))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
