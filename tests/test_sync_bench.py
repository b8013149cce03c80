"""python -m cbn bench --sync-ranks: SyncBatchNorm's overhead over BatchNorm under mpiexec."""

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.access(MPIEXEC, os.X_OK):
    MPIEXEC = shutil.which("mpiexec")
if MPIEXEC is None:
    pytest.skip("no mpiexec", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cbn", "bench", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_sync_ranks_prints_a_row_per_rank():
    p = _bench("--sync-ranks", "2", "--case", "4x8x6x6", "--repeat", "3")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("2 ranks, 4x8x6x6 float32 per rank")
    rows = [ln.split() for ln in lines[2:]]
    assert [r[0] for r in rows] == ["0", "1"]
    for r in rows:
        bn, sync, ratio = float(r[1]), float(r[2]), float(r[3])
        # times are printed to 0.1 us and the ratio to 0.01: the ratio of the printed
        # times is within their rounding of the printed ratio
        assert bn > 0 and sync > 0
        lo, hi = (sync - 0.05) / (bn + 0.05), (sync + 0.05) / (bn - 0.05)
        assert lo - 0.005 <= ratio <= hi + 0.005


@pytest.mark.parametrize("bad", ["0", "two", ""])
def test_sync_ranks_refuses_bad_counts(bad):
    p = _bench("--sync-ranks", bad)
    assert p.returncode == 2
    assert "--sync-ranks" in p.stderr
