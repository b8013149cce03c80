"""examples/data_parallel.py: the digits MLP trained data-parallel with SyncBatchNorm reaches
the weights of one process training on the concatenated batches (the example's --check
trains that process next to rank 0). Ranks as threads always; under mpiexec -n 4 when MPI
is installed. Needs scikit-learn for the data set."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from test_distributed_mpi import run_mpi

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "data_parallel.py"
F32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture
def example(monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("cbn_example_data_parallel", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_step_on_four_thread_ranks_is_one_process_to_rounding(example):
    r = example.main(["--threads", "4", "--epochs", "1", "--steps", "1", "--check"])
    assert r["ranks"] == 4
    assert r["weight_diff"][0] <= 4 * F32_EPS


def test_an_epoch_on_four_thread_ranks(example, capsys):
    r = example.main(["--threads", "4", "--epochs", "1", "--check"])
    out = capsys.readouterr().out
    assert "in communication" in out and r["comm_seconds"] > 0
    assert r["final"] > 0.9 and abs(r["final"] - r["ref_final"]) <= 1 / 450
    assert r["weight_diff"][0] <= 1e-4
    assert r["max_running_var_diff"] <= 1e-4


def test_mpiexec_four_ranks():
    pytest.importorskip("sklearn")
    out = run_mpi(4, EXAMPLE, "--epochs", "1", "--steps", "12", "--check")
    diffs = [float(v) for v in re.findall(r"weights differ from one process by (\S+)", out)]
    assert len(diffs) == 1 and diffs[0] <= 1e-5, out
    assert "4 rank(s)" in out and "in communication" in out
