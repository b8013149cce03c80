"""The timing harness (cbn/_timing.py), its tables, and the two places that use it:
``python -m cbn bench`` (cbn/_bench.py, including the contention mode) and the asv suite.

No time is asserted: the harness is driven by a fake clock that the timed callables
advance, so medians and ratios are known exactly; the real runs only check structure.
"""

from __future__ import annotations

import io
import json
import os
import time
import types

import pytest

from cbn import _bench, _timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    """A perf_counter that moves only when a timed callable says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def callable(self, seconds, calls=None):
        def fn():
            self.now += seconds
            if calls is not None:
                calls.append(seconds)
            return seconds
        return fn


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(_timing, "time", types.SimpleNamespace(
        perf_counter=fake.perf_counter, sleep=fake.sleep))
    return fake


# --------------------------------------------------------------------------- measure


def test_measure_median_and_counts_follow_the_clock(clock):
    res = _timing.measure({"a": clock.callable(1e-3), "b": clock.callable(4e-3)},
                          min_time=0.02, min_repeat=5)
    assert res["a"]["median"] == pytest.approx(1e-3)
    assert res["b"]["median"] == pytest.approx(4e-3)
    # a: 20 samples reach min_time; b: 5 reach it (0.02 s), and min_repeat is 5
    assert res["a"]["samples"] == 20 and res["b"]["samples"] == 5
    assert res["a"]["number"] == 1 and res["a"]["result"] == 1e-3
    assert len(res["a"]["times"]) == res["a"]["samples"]


def test_measure_batches_tiny_calls_into_samples(clock):
    calls, step = [], 2.0 ** -20            # about 1 us, exact in binary
    res = _timing.measure({"tiny": clock.callable(step, calls)}, min_time=0.0,
                          min_repeat=3)
    # the fewest calls that make a sample of SAMPLE_TIME, after one warm-up call and one
    # calibration call
    number = res["tiny"]["number"]
    assert (number - 1) * step < _timing.SAMPLE_TIME <= number * step
    assert len(calls) == 2 + 3 * number
    assert res["tiny"]["median"] == pytest.approx(step)


def test_measure_with_numbers_skips_warm_up_and_calibration(clock):
    calls = []
    res = _timing.measure({"f": clock.callable(1e-3, calls)}, numbers={"f": 4},
                          min_time=0.0, min_repeat=2)
    assert len(calls) == 8
    assert res["f"]["result"] is None and res["f"]["first"] is None
    assert res["f"]["number"] == 4


def test_measure_caps_slow_callables(clock):
    res = _timing.measure({"slow": clock.callable(0.01), "fast": clock.callable(1e-3)},
                          min_time=0.1, min_repeat=7,
                          slow_caps={"slow": (_timing.SLOW_CALL, 3)})
    assert res["slow"]["samples"] == 3
    assert res["fast"]["samples"] == 100


def test_measure_interleaves_round_by_round(clock):
    order = []

    def tagged(name):
        def fn():
            clock.now += 1e-3
            order.append(name)
        return fn

    _timing.measure({"a": tagged("a"), "b": tagged("b")}, min_time=0.0, min_repeat=3)
    timed = order[4:]           # after two calibrations of two calls each
    assert timed == ["a", "b"] * 3


def test_time_ratio_is_the_ratio_of_medians(clock):
    assert _timing.time_ratio(clock.callable(3e-3), clock.callable(1e-3)) == pytest.approx(3)
    assert _timing.median_time(clock.callable(2e-3)) == pytest.approx(2e-3)


@pytest.mark.parametrize("kwargs", [{"min_repeat": 0}])
def test_measure_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="min_repeat"):
        _timing.measure({"f": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        _timing.measure({})


# --------------------------------------------------------------------------- tables


def test_table_rows_printed_as_they_come_line_up():
    out = io.StringIO()
    table = _bench.ComparisonTable(["copy", "cbn", "numpy"], [(2, 8, 4, 4), (256, 1024)],
                                   list(_bench.OPS), file=out)
    table.header()
    for op, t in (("train", 1.2e-6), ("train_fused", 12.41e-3), ("eval_fused", 0.9e-6)):
        table.add({"case": "256x1024", "dtype": "float32", "layout": "nchw", "threads": 1,
                   "op": op, "median_s": {"copy": 19.2e-6, "cbn": t, "numpy": 6.4e-3},
                   "ratios": {"cbn/copy": t / 19.2e-6, "numpy/cbn": 6.4e-3 / t}})
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    # every right-aligned column ends at the same place on every line: the header's
    # title ends are where each row has a non-space followed by a space (or the end)
    header = lines[0]
    ends = [i + 1 for i, ch in enumerate(header)
            if ch != " " and (i + 1 == len(header) or header[i + 1] == " ")]
    for line in lines[2:]:
        assert len(line) == len(header)
        for end in [ends[3]] + ends[5:]:      # thr, then the times and ratios
            assert line[end - 1] != " " and (end == len(line) or line[end] == " "), line
    assert table.render() == lines


def test_table_widens_a_column_and_render_realigns():
    out = io.StringIO()
    table = _timing.Table(["name", "value"], file=out)
    table.header()
    table.row(["a", "1"])
    table.row(["a-much-longer-name", "22"])
    rendered = table.render()
    assert rendered[0] == "name" + " " * 15 + "value"
    assert rendered[2] == "a" + " " * 18 + "    1"
    assert rendered[3] == "a-much-longer-name    22"
    assert {len(line) for line in rendered} == {len(rendered[0])}


def test_format_table_alignment_and_errors():
    text = _timing.format_table(["x", "y"], [["left", 1], ["l", 100]], align="<>",
                                indent="  ")
    assert text.splitlines() == ["  x      y", "  ---- ---", "  left   1", "  l    100"]
    with pytest.raises(ValueError, match="cells"):
        _timing.format_table(["x", "y"], [["only one"]])
    with pytest.raises(ValueError, match="align"):
        _timing.Table(["x"], align="^")


@pytest.mark.parametrize("seconds, text", [(None, "-"), (1.23e-6, "1.2us"),
                                           (4.567e-3, "4.57ms"), (0.1234, "123ms"),
                                           (2.5, "2.5s")])
def test_fmt_time(seconds, text):
    assert _timing.fmt_time(seconds) == text


# --------------------------------------------------------------------------- python -m cbn bench


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        _bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "train_fused, eval_fused" in text and "default: all five" in text
    assert "--processes" in text and "(default 3)" in text


def test_bench_quick_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "rows.json"
    assert _bench.main(["--quick", "--case", "8x16", "--op", "train,eval_fused",
                        "--impl", "copy,cbn,numpy", "--min-time", "0.001", "--repeat", "1",
                        "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert [(r["case"], r["op"]) for r in doc["rows"]] == [("8x16", "train"),
                                                           ("8x16", "eval_fused")]
    assert all(not r["mismatch"] for r in doc["rows"])
    assert "eval_fused" in doc["table"]


@pytest.mark.parametrize("argv, message", [
    (["--processes", "0"], "--processes must be >= 1"),
    (["--processes", "2", "--op", "train_fused"], "--op takes"),
    (["--processes", "2", "--threads", "1,2"], "at most one --threads"),
    (["--processes", "2", "--rounds", "0"], "--rounds must be >= 1"),
])
def test_contention_rejects_bad_options(argv, message, capsys):
    assert _bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_contention_mode_runs_processes_and_reports_ratios(tmp_path, capsys):
    path = tmp_path / "contention.json"
    assert _bench.main(["--processes", "2", "--case", "8x16,2x8x4x4", "--layout", "nhwc",
                        "--op", "eval,backward", "--rounds", "2", "--min-time", "0.001",
                        "--repeat", "1", "--threads", "1", "--impl", "cbn",
                        "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["meta"]["settings"]["processes"] == 2
    assert doc["meta"]["settings"]["worker_threads"] == [1]
    assert [(r["case"], r["layout"], r["op"]) for r in doc["rows"]] == [
        ("8x16", "channels_first", "eval"), ("8x16", "channels_first", "backward"),
        ("2x8x4x4", "channels_last", "eval"), ("2x8x4x4", "channels_last", "backward")]
    for r in doc["rows"]:
        assert len(r["median_s"]) == 2 and all(len(x) == 2 for x in r["rounds_s"])
        assert r["worst_s"] == max(max(x) for x in r["rounds_s"])
        assert r["ratio"] == pytest.approx(max(r["median_s"]) / r["quiet_s"])
        assert r["worst_ratio"] == pytest.approx(r["worst_s"] / r["quiet_s"])
        assert r["worst_vs_one_thread"] == 1.0          # the processes ran on one thread
        assert r["torch_worst_s"] is None and r["worst_vs_torch"] is None  # --impl cbn
        assert r["target_met"] == (r["worst_ratio"] <= 3 or r["worst_vs_one_thread"] <= 1.3)
    assert doc["meta"]["settings"]["torch"] is False
    out = capsys.readouterr().out
    assert "p0" in out and "p1" in out and "worst/quiet" in out
    assert "torch worst" not in out and "target met on" in out


def test_contention_mode_times_torch_in_the_same_setup(tmp_path, capsys):
    pytest.importorskip("torch")
    path = tmp_path / "contention.json"
    assert _bench.main(["--processes", "2", "--case", "2x8x4x4", "--layout", "nchw,nhwc",
                        "--op", "train,backward", "--rounds", "2", "--min-time", "0.001",
                        "--repeat", "1", "--threads", "1", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["meta"]["settings"]["torch"] is True
    assert doc["meta"]["settings"]["torch_threads"] == [1]
    assert len(doc["rows"]) == 4
    for r in doc["rows"]:
        assert r["torch_worst_s"] > 0
        assert r["worst_vs_torch"] == pytest.approx(r["worst_s"] / r["torch_worst_s"])
        assert r["target_met"] == ((r["worst_ratio"] <= 3 or r["worst_vs_one_thread"] <= 1.3)
                                   and r["worst_vs_torch"] <= 1.5)
    out = capsys.readouterr().out
    assert "torch worst" in out and "worst/torch" in out and "target" in out


def test_contention_mode_impl_takes_cbn_and_torch_only(capsys):
    assert _bench.main(["--processes", "2", "--impl", "copy"]) == 2
    assert "--impl takes cbn" in capsys.readouterr().err
    assert _bench.main(["--processes", "2", "--impl", "torch"]) == 2   # cbn is always timed


def test_contention_mode_adds_the_forced_one_thread_phase(tmp_path, capsys):
    path = tmp_path / "contention.json"
    assert _bench.main(["--processes", "2", "--case", "2x8x4x4", "--layout", "nchw",
                        "--op", "train", "--rounds", "2", "--min-time", "0.001",
                        "--repeat", "1", "--threads", "2", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["meta"]["settings"]["worker_threads"] == [2]
    (r,) = doc["rows"]
    assert r["one_thread_worst_s"] > 0
    assert r["worst_vs_one_thread"] == pytest.approx(r["worst_s"] / r["one_thread_worst_s"])
    out = capsys.readouterr().out
    assert "1t worst" in out and "worst/1t" in out


def test_busy_thread_burns_cpu_outside_the_gil():
    before = time.process_time()
    stop = _bench.start_busy_thread()
    try:
        time.sleep(0.3)
    finally:
        stop.set()
    # the main thread slept: CPU time of the process is the busy thread's
    assert time.process_time() - before > 0.03


# --------------------------------------------------------------------------- asv suite


def test_asv_suite_uses_the_checkouts_harness(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import common
    assert os.path.samefile(common.timing.__file__, os.path.join(ROOT, "cbn", "_timing.py"))
    assert common.THREADS == 1
    assert common._multi_threads("2,4") == [2, 4]
    for bad in ("1", "", "two"):
        with pytest.raises(ValueError, match="CBN_ASV_MULTI_THREADS"):
            common._multi_threads(bad)


def test_asv_ratios_are_lower_is_better(monkeypatch):
    """Every track_* ratio is cbn's time over another's, so asv's 'higher = worse' holds."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import bench_ratios
    names = [n for cls in (bench_ratios.CbnOverNumpy, bench_ratios.CbnOverCopy)
             for n in dir(cls) if n.startswith("track_")]
    assert len(names) == 6 and all(n.startswith("track_cbn_over_") for n in names)
    bench = bench_ratios.CbnOverCopy()
    bench.setup("8192x128", "float32", "channels_first")
    assert bench.track_cbn_over_copy_eval_forward("8192x128", "float32",
                                                  "channels_first") > 0


# --------------------------------------------------------------------------- table, data, chart


def _fake_row(case, dtype="float32", layout="channels_first", threads=1, op="train",
              times=None):
    shape = [int(v) for v in case.split("x")]
    times = times or {"copy": 1e-3, "cbn": 2e-3, "cbn_out": 1.5e-3, "torch": 6e-3,
                      "ort": 5e-3, "numpy": 40e-3}
    parts = _bench._RATIO_PARTS
    return {"case": case, "shape": shape, "dtype": dtype, "layout": layout,
            "threads": threads, "op": op, "median_s": dict(times),
            "ratios": {k: times[a] / times[b] for k, (a, b) in parts.items()
                       if a in times and b in times},
            "mismatch": []}


def test_default_table_fits_100_columns_and_wide_shows_everything():
    cases = _bench.CASES + list(_bench.CASE_SETS["resnet50"])
    for wide, limit in ((False, 100), (True, None)):
        buf = io.StringIO()
        table = _bench.ComparisonTable(_bench.IMPLS, cases, _bench.OPS, file=buf, wide=wide,
                                       dtypes=("float32", "float64", "float16", "bfloat16"))
        table.header()
        for c in cases:
            for op in _bench.OPS:
                table.add(_fake_row(_bench.case_name(c), "bfloat16", "channels_last", 2, op))
        lines = buf.getvalue().splitlines()
        assert lines == table.render()            # printed as it came: nothing re-aligned
        if limit:
            assert max(map(len, lines)) <= limit, max(lines, key=len)
            assert lines[0].split() == ["case", "dtype", "layout", "thr", "op", "cbn",
                                        "torch", "torch/cbn", "numpy/cbn", "out/copy"]
        else:
            titles = lines[0].split()
            for name in ("copy", "out=", "ort", "numpy", "cbn/copy", "ort/cbn"):
                assert name in titles
        assert lines[2].split()[2] == "last"


def test_layout_names_are_one_vocabulary_with_aliases():
    from cbn import _benchdata
    for alias, name in (("nchw", "channels_first"), ("NHWC", "channels_last"),
                        ("channels-last", "channels_last"), ("channels_first", "channels_first")):
        assert _benchdata.parse_layout(alias) == name
    with pytest.raises(ValueError, match="unknown layout"):
        _benchdata.parse_layout("hwcn")
    assert _benchdata.array_shape((2, 3, 4, 5), "channels_last") == ((2, 4, 5, 3), -1)
    assert _benchdata.array_shape((2, 3), "channels_last") == ((2, 3), 1)
    assert not _benchdata.layout_applies((8, 16), "channels_last")


def test_bench_and_asv_draw_the_same_data(monkeypatch):
    """One recipe: the asv suite's cached case is make_case's arrays, bit for bit."""
    monkeypatch.syspath_prepend(ROOT)
    import numpy as np
    from benchmarks import common
    from cbn import _benchdata
    d = common.case("32x64x28x28", "float32", "channels_last")
    e = _benchdata.make_case((32, 64, 28, 28), "float32", "channels_last")
    for name in ("x", "g", "w", "b", "rm", "rv", "save_mean", "save_invstd"):
        assert np.array_equal(getattr(d, name), getattr(e, name)), name
    assert d.x.shape == (32, 28, 28, 64) and d.axis == -1
    assert common.LAYOUTS == list(_benchdata.LAYOUTS)
    # the bench's rows use the same input
    fns, _ = _bench._setup_row((32, 64, 28, 28), "float32", "channels_last", 1, "eval",
                               ("copy", "cbn"), None, None)
    from cbn import _reference
    expected = _reference.batch_norm_forward(e.x, e.w, e.b, e.rm.copy(), e.rv.copy(), False,
                                             0.1, 1e-5, axis=-1)[0]
    assert np.allclose(fns["cbn"](), expected, atol=1e-5)
    half = _benchdata.make_case((4, 3, 5), "float16")
    assert half.x.dtype == np.float16 and half.w.dtype == np.float32


def test_resnet50_set_has_53_layers_and_totals_weigh_them():
    layers = _bench.CASE_SETS["resnet50"]
    assert sum(layers.values()) == 53 and len(layers) == 12
    assert all(s[0] == 16 for s in layers)
    rows = [_fake_row(_bench.case_name(s), times={"cbn": 1e-3 * i, "torch": 3e-3 * i})
            for i, s in enumerate(layers, 1)]
    totals = _bench.set_totals(rows, layers)
    (t,) = totals.values()
    expect_cbn = sum(1e-3 * i * n for i, n in enumerate(layers.values(), 1))
    assert t["layers"] == 53
    assert t["total_s"]["cbn"] == pytest.approx(expect_cbn)
    assert t["ratios"]["torch/cbn"] == pytest.approx(3.0)
    assert _bench.set_totals(rows[:-1], layers) == {}       # a shape missing: no total


def test_progress_counts_rows_and_estimates_the_rest(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(_bench.time, "perf_counter", lambda: now[0])
    buf = io.StringIO()                    # not a terminal: a line every `every` seconds
    p = _bench.Progress([1, 1, 2], file=buf, every=10)
    now[0] += 20
    p.step()                               # 1 of weight 4 done in 20 s: 60 s left
    now[0] += 5
    p.step()                               # 5 s after the last line: nothing printed
    now[0] += 50
    p.step()
    assert buf.getvalue().splitlines() == ["row 1/3, 20s elapsed, about 1m00s left",
                                           "row 3/3, 1m15s elapsed"]


def test_case_sets_and_layout_aliases_on_the_command_line(capsys, tmp_path):
    path = tmp_path / "rows.json"
    assert _bench.main(["--case", "2x8x4x4", "--layout", "nhwc", "--op", "eval",
                        "--threads", "1", "--dtype", "float32", "--impl", "copy,cbn",
                        "--min-time", "0.001", "--repeat", "1", "--no-progress",
                        "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert [(r["layout"], r["axis"]) for r in doc["rows"]] == [("channels_last", -1)]
    assert _bench.main(["--layout", "sideways"]) == 2
    assert "unknown layout" in capsys.readouterr().err


def test_plot_draws_a_png_from_a_json_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    doc = {"meta": {"versions": {"cbn": "0", "torch": "2"}, "cpu": "test", "date": "2026"},
           "rows": [_fake_row(c, layout=lay, threads=t, op=op)
                    for c in ("8x16", "2x8x4x4") for lay in ("channels_first",)
                    for t in (1, 2) for op in ("train", "eval", "backward")]}
    src = tmp_path / "rows.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "chart.png"
    assert _bench.main(["--from-json", str(src), "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert height > width > 500        # 3 ratios x 2 thread counts: six panels, stacked


def test_progress_on_a_terminal_rewrites_one_line(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(_bench.time, "perf_counter", lambda: now[0])

    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    p = _bench.Progress([1, 1], file=buf)
    now[0] = 3.0
    p.step()
    p.clear()                              # erased: the table's next row takes the line
    now[0] = 6.0
    p.step()
    assert buf.getvalue() == ("\rrow 1/2, 3s elapsed, about 3s left\x1b[K"
                              "\r\x1b[K"
                              "\rrow 2/2, 6s elapsed\x1b[K\n")
