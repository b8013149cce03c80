"""The adaptive team (cbn/src/cbn_team.h): a parallel region that ran no faster than its
work on one thread means the cores are contended, and the next calls run on one thread for
a back-off period. The policy is driven here with synthetic region timings."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import cbn
from cbn import _kernels


@pytest.fixture(autouse=True)
def fresh_team():
    # every team size taken as started, so that the synthetic regions below are judged
    started = _kernels.team_state()["started"]
    _kernels._team_reset(True, started=64)
    yield
    _kernels._team_reset(True, started=started)


def test_the_first_region_of_a_team_is_not_judged():
    # A region of a size not seen before starts its threads (slow once: 300 us and more
    # for a process's first 2-thread region); that is no contention. The next such
    # region is judged.
    _kernels._team_reset(True, started=1)
    stalls = _kernels.team_state()["stalls"]
    _kernels._team_report(1_000_000, 200_000, 2)
    st = _kernels.team_state()
    assert _kernels._team_size(2) == 2 and st["stalls"] == stalls and st["started"] == 2
    _kernels._team_report(1_000_000, 200_000, 2)
    assert _kernels._team_size(2) == 1 and _kernels.team_state()["stalls"] == stalls + 1
    _kernels._team_reset(True)
    _kernels._team_report(2_000_000, 300_000, 4)        # a larger team: started anew
    assert _kernels._team_size(4) == 4 and _kernels.team_state()["started"] == 4


def test_a_new_process_keeps_its_team_through_its_first_parallel_call():
    # In a fresh process the first 2-thread call starts OpenMP's threads; what follows
    # must keep the team (a 16x2048x7x7 bfloat16-sized float32 eval: about 0.2 ms a call).
    code = ("import numpy as np, cbn; from cbn import _kernels as k\n"
            "x = np.random.default_rng(0).standard_normal((16, 256, 7, 7), np.float32)\n"
            "c = x.shape[1]; w = np.ones(c, np.float32); z = np.zeros(c, np.float32)\n"
            "cbn.batch_norm(x, z, w, w, z, False, n_threads=2)\n"
            "print(k.team_state()['started'])")
    env = {k: v for k, v in os.environ.items() if k != "CBN_ADAPTIVE_THREADS"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    if not cbn.openmp_enabled() or (os.cpu_count() or 1) < 2:
        pytest.skip("no second thread to start")
    assert p.stdout.split() == ["2"]


def test_a_stalled_region_sends_the_next_calls_to_one_thread():
    stalls = _kernels.team_state()["stalls"]
    assert _kernels._team_size(2) == 2
    _kernels._team_report(1_000_000, 900_000, 2)        # 1 ms wall, 0.9 ms of work
    st = _kernels.team_state()
    assert st["stalls"] == stalls + 1
    assert 0 < st["serial_for"] <= 0.01
    assert _kernels._team_size(2) == 1
    assert _kernels._team_size(1) == 1


def test_back_off_grows_while_regions_stall_and_shrinks_when_they_do_not():
    _kernels._team_report(1_000_000, 500_000, 4)
    assert _kernels.team_state()["backoff"] == pytest.approx(0.04)
    _kernels._team_report(1_000_000, 500_000, 4)
    assert _kernels.team_state()["backoff"] == pytest.approx(0.16)
    for _ in range(10):
        _kernels._team_report(1_000_000, 0, 4)
    assert _kernels.team_state()["backoff"] == pytest.approx(2.0)     # capped
    _kernels._team_reset()
    _kernels._team_report(1_000_000, 1_900_000, 2)      # a healthy 2-thread region
    assert _kernels.team_state()["serial_for"] == 0
    assert _kernels._team_size(2) == 2


def test_short_or_single_thread_regions_say_nothing():
    _kernels._team_report(10_000, 1, 2)          # 10 us: too short to judge
    _kernels._team_report(1_000_000, 1, 1)       # one thread
    assert _kernels.team_state()["serial_for"] == 0
    assert _kernels._team_size(3) == 3


def test_results_are_the_same_during_a_back_off():
    x = np.random.default_rng(0).standard_normal((8, 16, 64, 64)).astype(np.float32)
    want = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, n_threads=2)
    _kernels._team_report(1_000_000, 0, 2)
    assert _kernels._team_size(2) == 1
    got = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, n_threads=2)
    for a, b in zip(want, got):
        assert a.tobytes() == b.tobytes()


def test_turned_off_by_the_environment():
    code = ("import cbn._kernels as k; k._team_report(10**6, 0, 2); "
            "print(k.team_state()['adaptive'], k._team_size(2))")
    env = dict(os.environ, CBN_ADAPTIVE_THREADS="0")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "2"]


def test_a_quiet_process_keeps_its_team():
    # Region timings of repeated short calls on a quiet 2-core machine (a 256x1024 training
    # forward: 25-80 us regions): starting and joining the team cost about what the second
    # thread saves, so busy / wall is near 1, but no thread lost a scheduling delay. Such
    # regions must not send the process to one thread (main 5126ec6 did, every time).
    stalls = _kernels.team_state()["stalls"]
    for wall, busy in [(50_000, 52_000), (25_000, 24_000), (78_000, 80_000),
                       (120_000, 110_000), (200_000, 150_000)] * 20:
        _kernels._team_report(wall, busy, 2)
        assert _kernels._team_size(2) == 2
    st = _kernels.team_state()
    assert st["stalls"] == stalls and st["serial_for"] == 0


def test_a_cold_probe_after_a_back_off_keeps_the_team():
    # A real stall (a thread not scheduled for 0.9 ms), then, once the back-off is over,
    # the first region wakes cold threads: slower than warm, but not a stall.
    _kernels._team_report(1_000_000, 200_000, 2)
    assert _kernels._team_size(2) == 1
    backoff = _kernels.team_state()["backoff"]
    deadline = time.monotonic() + 5
    while _kernels._team_size(2) == 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    _kernels._team_report(150_000, 140_000, 2)          # 80 us lost per thread: waking up
    assert _kernels._team_size(2) == 2
    assert _kernels.team_state()["backoff"] == backoff  # not grown: it was no stall
