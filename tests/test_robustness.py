"""What a hostile user found (issue 21): copies inside a PreciseBN block, communicator tables
that never shrank, ranks with different settings, the largest counter, unclear errors, files
that save writes and load refuses. (Fork and MPI cases: tests/test_fork.py and
tests/test_distributed_mpi.py.)"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import cbn
from cbn.distributed import CollectiveError, ThreadCommunicator, all_reduce
from cbn.distributed import _adapters, _exchange

TIMEOUT = 20.0


def run_ranks(size, fn, *, timeout=TIMEOUT):
    """``fn(comm)`` on ``size`` threads, one ThreadCommunicator each; an exception is the
    result of a rank that raised."""
    comms = ThreadCommunicator.create(size, timeout=timeout)
    results = [None] * size

    def target(r):
        try:
            results[r] = fn(comms[r])
        except BaseException as e:  # noqa: BLE001 -- reported to the test
            results[r] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def _batches():
    rng = np.random.default_rng(3)
    return [rng.normal(2.0, 3.0, (n, 4)).astype(np.float32) for n in (6, 9, 5)]


# ------------------------------------------------------------- 3: copies inside PreciseBN


def test_deepcopy_inside_precise_statistics_is_a_module_of_its_own():
    bn = cbn.BatchNorm1d(4)
    with cbn.precise_statistics([bn]):
        for b in _batches():
            bn(b)
        twin = copy.deepcopy(bn)
        start = twin.running_mean.astype(np.float64)
    rm, rv, n = bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked
    assert "forward" not in vars(twin)
    y = np.random.default_rng(0).normal(-5.0, 0.5, (16, 4)).astype(np.float32)
    twin(y)
    # the original is untouched, the copy moved its own statistics
    assert np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == n and twin.num_batches_tracked == n + 1
    want = 0.9 * start + 0.1 * y.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(twin.running_mean, want, rtol=1e-5, atol=1e-5)


def test_pickle_inside_precise_statistics():
    bn = cbn.BatchNorm1d(4)
    with cbn.precise_statistics([bn]) as stats:
        bn(_batches()[0])
        back = pickle.loads(pickle.dumps(bn))
        bn(_batches()[1])
    assert "forward" not in vars(back)
    assert stats.moments[0].count == 15           # the copy's calls were not counted
    back(_batches()[2])
    assert back.num_batches_tracked == 2


# ----------------------------------------------------------- 4: tables freed with comms


def _table_sizes():
    gc.collect()
    return len(_adapters._ADAPTERS), len(_exchange._STATES)


def test_thread_communicators_are_freed():
    before = _table_sizes()
    for _ in range(50):
        run_ranks(2, lambda c: all_reduce([np.ones(3)], c))
    assert _table_sizes() == before


def test_duck_typed_communicators_are_freed():
    class Alone:
        rank, size = 0, 1

        def allgather(self, buf):
            return np.asarray(buf, np.float64).reshape(1, -1)

    before = _table_sizes()
    for _ in range(200):
        comm = Alone()
        bn = cbn.SyncBatchNorm(3, comm=comm)
        bn(np.ones((4, 3), np.float32))
        assert cbn.distributed.communication_time(comm) == 0.0
        del bn, comm
    assert _table_sizes() == before


def test_mpi_like_communicators_are_freed_and_share_their_counter():
    class Fake:                             # mpi4py's methods, one rank
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def Allgather(self, send, recv):
            recv[0] = send

    before = _table_sizes()
    raw = Fake()
    a = cbn.distributed.as_communicator(raw)
    assert cbn.distributed.as_communicator(raw) is a
    ch = _exchange._channel(raw)
    ch.calls += 5
    assert _exchange._channel(a).calls == 5        # one counter per communicator
    assert _table_sizes() != before
    del raw, a, ch
    assert _table_sizes() == before


# ------------------------------------------------ 5: settings that change the statistics


@pytest.mark.parametrize("setting", ["unbiased", "track_running_stats"])
def test_ranks_with_different_settings_raise_on_every_rank(setting):
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)

    def rank(comm):
        bn = cbn.SyncBatchNorm(4, comm=comm, **{setting: comm.rank == 0})
        before = None if bn.running_var is None else bn.running_var.copy()
        try:
            bn(x)
        except CollectiveError as e:
            unchanged = before is None or np.array_equal(bn.running_var, before)
            return str(e), unchanged
        return "no error", None

    results = run_ranks(2, rank)
    for msg, unchanged in results:
        assert "settings" in msg and setting in msg, msg
        assert unchanged
    assert results[0][0] == results[1][0]


def test_precise_statistics_ranks_with_different_unbiased_raise():
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)

    def rank(comm):
        bn = cbn.BatchNorm1d(4, unbiased=comm.rank == 0)
        try:
            with cbn.precise_statistics([bn], comm=comm):
                bn(x)
        except CollectiveError as e:
            return str(e)
        return "no error"

    assert all("disagree" in r for r in run_ranks(2, rank))


# -------------------------------------------------------------- 6: the largest counter


@pytest.mark.parametrize("cls", ["BatchNorm1d", "SyncBatchNorm"])
def test_largest_counter_stays_usable(cls, tmp_path):
    kw = {"comm": ThreadCommunicator.create(1)[0]} if cls == "SyncBatchNorm" else {}
    bn = getattr(cbn, cls)(3, momentum=None, **kw)
    state = bn.state_dict()
    state["num_batches_tracked"] = np.array(2**63 - 1)
    bn.load_state_dict(state)
    bn(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    assert bn.num_batches_tracked == 2**63 - 1
    assert int(bn.state_dict()["num_batches_tracked"]) == 2**63 - 1
    back = cbn.load(bn.save(tmp_path / "bn"))
    assert back.num_batches_tracked == 2**63 - 1


# ------------------------------------------------------------------ 7, 8: load and save


@pytest.mark.parametrize("bad", [None, 3, ["bn.npz"]])
def test_load_refuses_what_is_not_a_path_or_file(bad):
    with pytest.raises(TypeError, match="path must be"):
        cbn.load(bad)


def test_save_refuses_arrays_that_load_would_refuse(tmp_path):
    bn = cbn.BatchNorm1d(3)
    bn.weight = np.array([1.0, 2.0, 3.0])                  # float64 in a float32 module
    bn(np.ones((4, 3), np.float32))                        # it computes
    with pytest.raises(ValueError, match="weight has dtype float64"):
        bn.save(tmp_path / "bn")
    assert not os.listdir(tmp_path)                        # nothing written
    bn.weight = bn.weight.astype(np.float32)
    assert np.array_equal(cbn.load(bn.save(tmp_path / "bn")).weight, [1, 2, 3])


# ------------------------------------------------------------------ 9: unclear errors


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1, "5"])
def test_thread_communicator_timeout_is_checked(timeout):
    with pytest.raises((ValueError, TypeError), match="timeout"):
        ThreadCommunicator.create(2, timeout=timeout)


def test_mpi_communicator_timeout_is_checked():
    class One:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def Allgather(self, send, recv):
            recv[0] = send

    for bad in (float("inf"), 0, -1):
        with pytest.raises(ValueError, match="timeout"):
            cbn.distributed.MPICommunicator(One(), timeout=bad)
    assert cbn.distributed.MPICommunicator(One(), timeout=None).timeout is None


def _onnx_node(**attrs):
    onnx = pytest.importorskip("onnx")
    import onnx.helper
    return onnx, onnx.helper.make_node("BatchNormalization", ["X", "g", "b", "m", "v"], ["Y"],
                                       **attrs)


def test_from_onnx_sequence_of_arrays_is_a_type_error():
    _, node = _onnx_node()
    with pytest.raises(TypeError, match=r"initializers\[0\]"):
        cbn.BatchNorm2d.from_onnx(node, [np.ones(2)] * 4)


@pytest.mark.parametrize("mode", [2, -1])
def test_from_onnx_training_mode_must_be_0_or_1(mode):
    _, node = _onnx_node(training_mode=mode)
    params = {k: np.ones(2, np.float32) for k in "gbmv"}
    with pytest.raises(ValueError, match="training_mode"):
        cbn.BatchNorm2d.from_onnx(node, params)


def test_from_onnx_string_training_mode():
    onnx, node = _onnx_node(training_mode="0")
    params = {k: np.ones(2, np.float32) for k in "gbmv"}
    with pytest.raises(ValueError, match="training_mode"):
        cbn.BatchNorm2d.from_onnx(node, params)


def test_from_onnx_external_initializer(tmp_path):
    onnx, node = _onnx_node()
    import onnx.numpy_helper
    inits = []
    for k in "gbmv":
        t = onnx.numpy_helper.from_array(np.ones(2, np.float32), k)
        t.data_location = onnx.TensorProto.EXTERNAL
        t.ClearField("raw_data")
        e = t.external_data.add()
        e.key, e.value = "location", "weights.bin"
        inits.append(t)
    with pytest.raises(ValueError, match="external"):
        cbn.BatchNorm2d.from_onnx(node, inits)


@pytest.mark.parametrize("value, adaptive, warns", [("junk", True, True), ("OFF", False, False),
                                                    ("0", False, False), ("on", True, False)])
def test_adaptive_threads_environment_variable(value, adaptive, warns):
    code = ("import warnings; warnings.simplefilter('always'); import cbn; "
            "print(cbn._kernels.team_state()['adaptive'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, CBN_ADAPTIVE_THREADS=value), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(adaptive)]
    assert ("CBN_ADAPTIVE_THREADS ignored" in p.stderr) == warns, p.stderr


# ------------------------------------------- SyncBatchNorm.backward takes out=, as BatchNorm


def test_sync_backward_out():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 5)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)

    def rank(comm):
        part = x[4 * comm.rank:4 * comm.rank + 4]
        gp = g[4 * comm.rank:4 * comm.rank + 4]
        bn = cbn.SyncBatchNorm(3, comm=comm)
        bn(part)
        want = bn.backward(gp)
        bn.zero_grad()
        bn(part)
        out = np.empty_like(part)
        got = bn.backward(gp, out=out)
        bad = None
        try:
            bn.backward(gp, out=np.empty(part.shape, np.float64))
        except ValueError as e:
            bad = str(e)
        return got is out and np.array_equal(out, want), bad

    for same, bad in run_ranks(2, rank):
        assert same
        assert bad is not None and "out must be" in bad


def test_sync_and_plain_modules_share_the_step_logic():
    # SyncBatchNorm on one rank is BatchNorm: momentum=None, unbiased=False, accumulation
    rng = np.random.default_rng(2)
    comm = ThreadCommunicator.create(1)[0]
    mods = [cls(3, momentum=None, unbiased=False, **kw) for cls, kw in
            ((cbn.BatchNorm1d, {}), (cbn.SyncBatchNorm, {"comm": comm}))]
    for _ in range(3):
        x = rng.standard_normal((6, 3)).astype(np.float32)
        g = rng.standard_normal((6, 3)).astype(np.float32)
        outs = [(m(x), m.backward(g)) for m in mods]
        assert all(np.array_equal(a, b) for a, b in zip(*outs))
    for k in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        assert np.array_equal(getattr(mods[0], k), getattr(mods[1], k)), k
