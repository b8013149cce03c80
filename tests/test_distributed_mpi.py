"""SyncBatchNorm across real processes: ``mpiexec -n 2`` and ``-n 4`` on tests/mpi/sync_check.py
(skipped without mpi4py or mpiexec: ``pip install "cbn[mpi]"``), and two processes joined by
torch.distributed's gloo backend on 127.0.0.1 (skipped without PyTorch).

Each run has a timeout; the scripts abort every rank on the first failure (comm.Abort), and
a run that times out is killed with its whole process group.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi"
TIMEOUT = 120


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                         env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")       # several ranks share few cores
    env.update(extra)
    return env


def _run(procs_args, timeout=TIMEOUT):
    """Start each argv (with its env) in one new process group; wait for all of them.
    Returns [(returncode, output)]; kills the group on timeout and fails the test."""
    procs = []
    try:
        for argv, env in procs_args:
            procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outs)]
    except subprocess.TimeoutExpired:
        pytest.fail(f"{procs_args[0][0]} did not finish within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def mpiexec():
    """argv prefix of the MPI launcher next to this Python (the mpich wheel puts it in the
    venv's bin), else on PATH; skips the test when MPI is not installed."""
    try:
        import mpi4py  # noqa: F401 -- only whether it is there (MPI itself starts in the ranks)
    except ImportError as e:
        pytest.skip(f"mpi4py is not usable ({e}): pip install 'cbn[mpi]'")
    exe = (shutil.which("mpiexec", path=os.path.dirname(sys.executable))
           or shutil.which("mpiexec"))
    if exe is None:
        pytest.skip("no mpiexec (pip install 'cbn[mpi]')")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    if "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr:
        return [exe, "--allow-run-as-root", "--oversubscribe"]
    return [exe]


def run_mpi(n, script, *args, timeout=TIMEOUT):
    argv = mpiexec() + ["-n", str(n), sys.executable, str(script), *args]
    (rc, out), = _run([(argv, _env())], timeout)
    assert rc == 0, out
    return out


def _ranks_ok(out):
    """The ranks that printed "rank R: ok" (lines of several ranks may interleave)."""
    return sorted(int(r) for r in re.findall(r"rank (\d+): ok", out))


@pytest.mark.parametrize("n", [2, 4])
def test_mpi_sync_batchnorm(n):
    out = run_mpi(n, SCRIPTS / "sync_check.py", "general")
    assert _ranks_ok(out) == list(range(n)), out


@pytest.mark.parametrize("n", [2, 4])
def test_mpi_all_data_on_one_rank_is_batchnorm_bit_for_bit(n):
    out = run_mpi(n, SCRIPTS / "sync_check.py", "exact")
    assert _ranks_ok(out) == list(range(n)), out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_through_the_torch_adapter():
    pytest.importorskip("torch")
    port = str(_free_port())
    size = 2
    runs = [([sys.executable, str(SCRIPTS / "gloo_check.py")],
             _env(RANK=str(r), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port))
            for r in range(size)]
    res = _run(runs)
    for r, (rc, out) in enumerate(res):
        assert rc == 0 and f"rank {r}: ok" in out, out


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["eval", "skip", "settings"])
def test_mpi_ranks_that_disagree_do_not_wait_forever(mode, n, tmp_path):
    # one rank in eval mode or skipping a call: the others raise CollectiveError after the
    # communicator's timeout (2 s here); different `unbiased`: every rank raises at once
    out = run_mpi(n, SCRIPTS / "hang_check.py", mode, str(tmp_path), timeout=90)
    assert _ranks_ok(out) == list(range(n)), out
