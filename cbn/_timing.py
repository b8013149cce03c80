"""The one timing harness of cbn, and the one table formatter.

``python -m cbn bench`` (:mod:`cbn._bench`) and the asv suite in ``benchmarks/`` both time
with :func:`measure` and print with :class:`Table`. The module uses the standard library
only and never imports cbn: the asv suite loads this file from its own checkout, so the
method stays the same whichever commit of cbn it measures.

Machines here are shared and noisy, so the harness is built for ratios taken in one
process: callables are interleaved round by round (one sample of each in turn), so noise
hits them alike, and a figure is a median.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, TextIO

__all__ = ["SAMPLE_TIME", "MAX_SAMPLES", "SLOW_CALL", "calibrate", "measure", "median_time",
           "time_ratio", "fmt_time", "fmt_ratio", "Table", "format_table"]

#: One timed sample runs a callable this long at least (several calls for tiny inputs), so
#: the resolution of the clock and the loop overhead do not matter.
SAMPLE_TIME = 2e-4
#: Upper bound on the samples of one callable in one measurement.
MAX_SAMPLES = 2000
#: A call slower than this many seconds counts as slow for ``slow_caps``.
SLOW_CALL = 5e-3


def calibrate(fn: Callable[[], object], sample_time: float = SAMPLE_TIME) -> tuple:
    """Call ``fn`` once to warm up and once timed.

    Returns ``(result of the first call, seconds of the second, calls per sample)``, the
    last being how many calls make one sample of at least ``sample_time`` seconds
    (1 to 10000).
    """
    result = fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    number = max(1, min(10000, int(math.ceil(sample_time / max(once, 1e-9)))))
    return result, once, number


def measure(fns: Mapping[str, Callable[[], object]], *, min_time: float = 0.2,
            min_repeat: int = 7, caps: Optional[Mapping[str, int]] = None,
            slow_caps: Optional[Mapping[str, tuple]] = None,
            max_time: Optional[float] = None, settle: float = 0.0,
            block_time: float = 0.0,
            numbers: Optional[Mapping[str, int]] = None) -> Dict[str, dict]:
    """Median time of one call of each callable, interleaved round by round.

    Each callable is calibrated (:func:`calibrate`: one warm-up call, whose result is
    returned as ``result``, and one timed call that sets how many calls make a sample),
    unless ``numbers[name]`` gives its calls per sample: then it is neither warmed up nor
    calibrated (``result`` and ``first`` are None). Then, round after round, every
    callable that still needs samples is timed once, in the order of ``fns``. A callable
    needs samples until it has ``min_repeat`` of them and ``min_time`` seconds in all, or
    reaches its cap (``caps[name]``, or MAX_SAMPLES; ``slow_caps[name] = (seconds, cap)``
    applies ``cap`` when the calibration call took longer than ``seconds``). ``max_time``
    (default 20 * min_time + 5 s) bounds the loop as a whole once every callable has 3
    samples (or its cap).

    With ``settle`` > 0 a round gives each callable a block instead of one sample: sleep
    ``settle`` seconds, one untimed call (unless the callable is slow), then samples for
    ``block_time`` seconds. That is for callables that bring their own thread pools (two
    OpenMP runtimes in one process, each with several threads): the worker threads of one
    spin for milliseconds after each parallel region and would steal the cores the other's
    team needs, so fine interleaving would measure that interference rather than the code.

    Returns, per name: ``median`` and ``min`` (seconds per call), ``samples`` (how many),
    ``number`` (calls per sample), ``times`` (every sample, seconds per call, in order),
    ``first`` (the calibration call's seconds) and ``result``. The garbage collector is
    off while timing.
    """
    if not fns:
        raise ValueError("measure: fns is empty")
    if min_repeat < 1:
        raise ValueError(f"measure: min_repeat must be >= 1, got {min_repeat}")
    caps = dict(caps or {})
    numbers = dict(numbers or {})
    if max_time is None:
        max_time = 20 * min_time + 5.0
    state: Dict[str, dict] = {}
    for name, fn in fns.items():
        if name in numbers:
            result, once, number = None, None, max(1, int(numbers[name]))
        else:
            result, once, number = calibrate(fn)
        cap = caps.get(name, MAX_SAMPLES)
        if slow_caps and name in slow_caps and once is not None and once > slow_caps[name][0]:
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
                    if s["first"] is None or s["first"] < SLOW_CALL:
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
                   "samples": len(s["samples"]), "number": s["number"],
                   "times": list(s["samples"]), "first": s["first"], "result": s["result"]}
            for name, s in state.items()}


def median_time(fn: Callable[[], object], *, min_repeat: int = 5,
                min_time: float = 0.05) -> float:
    """Median seconds of one call of ``fn`` (:func:`measure` of ``fn`` alone)."""
    return measure({"fn": fn}, min_repeat=min_repeat, min_time=min_time)["fn"]["median"]


def time_ratio(numerator: Callable[[], object], denominator: Callable[[], object], *,
               min_repeat: int = 5, min_time: float = 0.1, slow_repeat: int = 3) -> float:
    """Time of ``numerator`` over time of ``denominator``: the median of the ratios of
    samples taken one after the other.

    :func:`measure` interleaves the two, so sample i of each comes from the same round; a
    load that changes during the measurement (another tenant starting, a core lost for a
    while) cancels within each pair, and the median discards the pairs one side of which
    was descheduled. On a loaded machine that is far steadier than a ratio of the two
    medians. Either side whose calibration call takes longer than SLOW_CALL is timed
    ``slow_repeat`` times only (the NumPy reference on large inputs); the pairs are then
    the first ``slow_repeat`` rounds.
    """
    res = measure({"numerator": numerator, "denominator": denominator},
                  min_repeat=min_repeat, min_time=min_time,
                  slow_caps={"numerator": (SLOW_CALL, slow_repeat),
                             "denominator": (SLOW_CALL, slow_repeat)})
    return statistics.median(a / b for a, b in zip(res["numerator"]["times"],
                                                   res["denominator"]["times"]))


# --------------------------------------------------------------------------- formatting


def fmt_time(t: Optional[float]) -> str:
    """Seconds as a short string: ``12.3us``, ``4.56ms``, ``123ms``, ``1.2s``; None: ``-``."""
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f}us"
    if t < 1.0:
        return f"{t * 1e3:.3g}ms" if t >= 0.1 else f"{t * 1e3:.2f}ms"
    return f"{t:.3g}s"


def fmt_ratio(r: Optional[float]) -> str:
    """A ratio with two decimals (none from 100 on); None: ``-``."""
    if r is None:
        return "-"
    return f"{r:.2f}" if r < 100 else f"{r:.0f}"


class Table:
    """A table printed row by row, its columns aligned.

    ``titles`` name the columns; ``align`` gives ``"<"`` (left) or ``">"`` (right) per
    column (default: the first column left, the others right); ``widths`` gives a
    minimum width per column, e.g. the longest value it will hold, so rows printed as
    they come line up. A cell wider than its column widens the column from that row on;
    :meth:`render` re-aligns the whole table afterwards, every column as wide as its
    widest cell (or its minimum width). A row may carry a ``suffix`` printed after its last column (a note that
    is not a column).
    """

    def __init__(self, titles: Sequence[str], *, align: Optional[Sequence[str]] = None,
                 widths: Optional[Sequence[int]] = None, file: Optional[TextIO] = None,
                 indent: str = "", sep: str = " ", rule: bool = True):
        self.titles = [str(t) for t in titles]
        n = len(self.titles)
        if align is None:
            align = ["<"] + [">"] * (n - 1)
        if len(align) != n or any(a not in "<>" for a in align):
            raise ValueError(f"align must be {n} of '<' or '>', got {align!r}")
        if widths is not None and len(widths) != n:
            raise ValueError(f"widths must have {n} entries, got {len(widths)}")
        self.align = list(align)
        self.widths = [max(len(t), int(w)) for t, w in zip(self.titles, widths or [0] * n)]
        self.file = file
        self.indent, self.sep, self.rule = indent, sep, rule
        self.rows: List[tuple] = []

    def _line(self, cells: Sequence[str], widths: Sequence[int], suffix: str = "") -> str:
        text = self.sep.join(f"{c:{a}{w}}" for c, a, w in zip(cells, self.align, widths))
        return (self.indent + text + suffix).rstrip()

    def _print(self, line: str) -> None:
        print(line, file=self.file or sys.stdout, flush=True)

    def header(self) -> None:
        """Print the titles (and a rule under them)."""
        self._print(self._line(self.titles, self.widths))
        if self.rule:
            self._print(self._line(["-" * w for w in self.widths], self.widths))

    def row(self, cells: Sequence[object], suffix: str = "") -> None:
        """Print one row (cells are converted with ``str``) and keep it for :meth:`render`."""
        cells = self._keep(cells, suffix)
        self._print(self._line(cells, self.widths, suffix))

    def _keep(self, cells: Sequence[object], suffix: str) -> List[str]:
        cells = [str(c) for c in cells]
        if len(cells) != len(self.titles):
            raise ValueError(f"a row needs {len(self.titles)} cells, got {len(cells)}")
        self.widths = [max(w, len(c)) for w, c in zip(self.widths, cells)]
        self.rows.append((cells, suffix))
        return cells

    def render(self) -> List[str]:
        """The whole table as lines, each column as wide as its widest cell, its title or
        its minimum width: what was printed, if no cell widened a column."""
        widths = self.widths      # the minimum widths, widened by every wider cell
        lines = [self._line(self.titles, widths)]
        if self.rule:
            lines.append(self._line(["-" * w for w in widths], widths))
        lines.extend(self._line(cells, widths, suffix) for cells, suffix in self.rows)
        return lines


def format_table(titles: Sequence[str], rows: Sequence[Sequence[object]], *,
                 align: Optional[Sequence[str]] = None, indent: str = "",
                 sep: str = " ", rule: bool = True) -> str:
    """All rows at once as aligned text (see :class:`Table`)."""
    table = Table(titles, align=align, indent=indent, sep=sep, rule=rule)
    for cells in rows:
        table._keep(cells, "")
    return "\n".join(table.render())
