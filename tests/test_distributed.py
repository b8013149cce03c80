"""cbn.SyncBatchNorm, cbn.precise_statistics and the communicators, with ranks that are
threads of this process (cbn.distributed.ThreadCommunicator).

Oracles: cbn.BatchNorm on the concatenation of all ranks' batches (what data-parallel
training must reproduce), and float64 statistics computed here from the definitions with
math.fsum. Real multi-process runs (mpiexec, gloo) are in test_distributed_mpi.py.
"""

from __future__ import annotations

import copy
import math
import pickle
import sys
import threading

import numpy as np
import pytest

import cbn
from cbn import distributed as D
from cbn.distributed import CollectiveError, SyncBatchNorm, ThreadCommunicator
from cbn.distributed._exchange import _channel

from conftest import assert_close, assert_close_sums, forward_scale, make_params

TIMEOUT = 20.0


# ----------------------------------------------------------------------------- helpers


def run_ranks(size, fn, *, timeout=TIMEOUT):
    """Run ``fn(comm)`` on ``size`` threads, one ThreadCommunicator each. Returns the
    per-rank results, with an exception as the result of a rank that raised."""
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


def ok(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def split(x, sizes):
    """``x`` cut along axis 0 into consecutive parts of the given sizes."""
    assert sum(sizes) == x.shape[0]
    edges = np.cumsum([0] + list(sizes))
    return [x[a:b] for a, b in zip(edges[:-1], edges[1:])]


def data(shape, axis, dtype, seed=0, loc=(-3.0, 3.0), spread=(0.5, 2.0)):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    cs = [1] * len(shape)
    cs[axis] = C
    mean = rng.uniform(*loc, C).reshape(cs)
    std = rng.uniform(*spread, C).reshape(cs)
    return (rng.standard_normal(shape) * std + mean).astype(dtype)


def exact_stats(x, axis):
    """Per-channel (n, mean, unbiased var) in float64 from math.fsum (correctly rounded
    sums): the independent oracle for the statistics."""
    xm = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])
    n = xm.shape[0]
    mean = np.array([math.fsum(col) / n for col in xm.T])
    m2 = np.array([math.fsum((col - mu) ** 2) for col, mu in zip(xm.T, mean)])
    return n, mean, m2 / (n - 1)


def snapshot(m):
    return (m.num_batches_tracked, copy.deepcopy(m.state_dict()),
            None if m.grad_weight is None else m.grad_weight.copy(),
            None if m.grad_bias is None else m.grad_bias.copy())


def assert_same_state(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert np.array_equal(a[1][k], b[1][k]), k
    for u, v in zip(a[2:], b[2:]):
        assert (u is None and v is None) or np.array_equal(u, v)


def ulp_bound(dtype, scale, ulps=2):
    return ulps * float(np.finfo(dtype).eps) * np.asarray(scale, np.float64)


# (shape, axis) of the whole batch; ranks split axis 0
CASES = [((24, 5), 1), ((12, 3, 4, 5), 1), ((12, 4, 5, 3), -1), ((18, 4, 7), 1)]
CASE_IDS = ["NC", "NCHW", "NHWC", "NCL"]


def make_module(C, dtype, axis, comm, momentum=0.3, cls=None, **kw):
    cls = cls or SyncBatchNorm
    extra = {} if cls is not SyncBatchNorm else {"comm": comm}
    m = cls(C, momentum=momentum, dtype=dtype, axis=axis, **extra, **kw)
    w, b, rm, rv = make_params(C, dtype)
    if m.affine:
        m.weight[...] = w
        m.bias[...] = b
    if m.track_running_stats:
        m.running_mean[...] = rm
        m.running_var[...] = rv
    return m


def train_step(m, x, g):
    y = m.forward(x)
    dx = m.backward(g)
    return y, dx


# ------------------------------------------------------------------ against one process


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("sizes", [(6, 6), (1, 5, 0, 6), (0, 11, 1), (3, 3, 3, 3)],
                         ids=["even2", "uneven4", "empty3", "even4"])
def test_matches_one_process_on_the_concatenated_batch(case, sizes, dtype):
    shape, axis = case
    N = shape[0]
    sizes = tuple(s * N // 12 for s in sizes)
    sizes = sizes[:-1] + (N - sum(sizes[:-1]),)
    C = shape[axis]
    x = data(shape, axis, dtype)
    g = data(shape, axis, dtype, seed=5, loc=(-1, 1))
    xs, gs = split(x, sizes), split(g, sizes)

    def rank(comm):
        m = make_module(C, dtype, axis, comm)
        out = []
        for _ in range(2):                       # two steps: running stats accumulate
            y, dx = train_step(m, xs[comm.rank], gs[comm.rank])
            out.append((y, dx))
        D.all_reduce_grads(m)
        return out, m.running_mean.copy(), m.running_var.copy(), m.num_batches_tracked, \
            m.grad_weight.copy(), m.grad_bias.copy()

    res = ok(run_ranks(len(sizes), rank))
    bn = make_module(C, dtype, axis, None, cls=cbn.BatchNorm)
    ref = [train_step(bn, x, g) for _ in range(2)]

    # Every rank holds the same statistics, bit for bit.
    for r in res[1:]:
        for a, b in zip(r[1:], res[0][1:]):
            assert np.array_equal(a, b)
    _, rm, rv, nbt, gw, gb = res[0]
    assert nbt == bn.num_batches_tracked == 2
    if dtype == np.float32:
        np.testing.assert_array_max_ulp(rm, bn.running_mean, maxulp=1)
        np.testing.assert_array_max_ulp(rv, bn.running_var, maxulp=1)
    else:
        np.testing.assert_allclose(rm, bn.running_mean, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(rv, bn.running_var, rtol=1e-13)

    n = x.size // C
    for step in range(2):
        y = np.concatenate([r[0][step][0] for r in res])
        dx = np.concatenate([r[0][step][1] for r in res])
        y_bn, dx_bn = ref[step]
        assert y.dtype == dx.dtype == np.dtype(dtype)
        _, mean, var = exact_stats(x, axis)
        var_b = var * (n - 1) / n
        invstd = 1 / np.sqrt(var_b + bn.eps)
        scale = forward_scale(x, axis, invstd, bn.weight, bn.bias)
        # within 2 ulp (of each channel's scale) of one process, and of the float64 oracle
        assert np.all(np.abs(y.astype(np.float64) - y_bn) <= ulp_bound(dtype, scale))
        cs = [1] * x.ndim
        cs[axis] = C
        xhat = (x.astype(np.float64) - mean.reshape(cs)) * invstd.reshape(cs)
        y_ref = xhat * bn.weight.reshape(cs).astype(np.float64) + bn.bias.reshape(cs)
        assert_close(y, y_ref, dtype, n, scale=scale, err_msg="y")
        dy = g.astype(np.float64)
        gscale = (np.abs(bn.weight.astype(np.float64)) * invstd).reshape(cs) * (
            np.abs(dy).max() * (1 + np.abs(xhat).max()))
        assert np.all(np.abs(dx.astype(np.float64) - dx_bn) <= ulp_bound(dtype, gscale))
    # parameter gradients: rank contributions summed (two backwards accumulated)
    terms_b = dy
    assert_close_sums(gb, 2 * terms_b.sum(axis=tuple(i for i in range(x.ndim)
                                                      if i != axis % x.ndim)),
                      2 * terms_b, axis, dtype, factor=2)
    terms_w = dy * xhat
    assert_close_sums(gw, 2 * terms_w.sum(axis=tuple(i for i in range(x.ndim)
                                                      if i != axis % x.ndim)),
                      2 * terms_w, axis, dtype, factor=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loc", [0.0, 1e3, 1e6])
def test_statistics_exact_on_hard_data(dtype, loc):
    """Mean loc, std 1 (where E[x^2] - E[x]^2 loses everything): the merged statistics are
    the float64 statistics of all values, to 1e-13 relative (float64 data) or to the
    rounding of the module's float32 buffers. Merging means that are only known to
    ulp(loc) costs the variance about eps * loc / std relative: the bound grows with loc
    beyond 1e3 (any merged computation, one process's blocked kernels included, has it)."""
    C = 6
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40, C, 9)) + loc).astype(dtype)
    sizes = (7, 0, 20, 13)
    xs = split(x, sizes)

    def rank(comm):
        m = SyncBatchNorm(C, momentum=1.0, dtype=dtype, comm=comm)
        m.forward(xs[comm.rank])
        return m.running_mean, m.running_var

    res = ok(run_ranks(4, rank))
    _, mean, var = exact_stats(x, 1)
    rm, rv = res[0]
    if dtype == np.float64:
        assert np.all(np.abs(rm - mean) <= 1e-13 * np.maximum(np.abs(mean), np.sqrt(var)))
        assert np.all(np.abs(rv - var) <= 1e-13 * max(1.0, loc / 1e3) * var)
    else:
        # float32 data is summed in float32 lanes (then merged in float64), as in one
        # process: errors of a few float32 roundings of the data's scale, no cancellation
        eps = np.finfo(np.float32).eps
        std = np.sqrt(var)
        assert np.all(np.abs(rm - mean) <= 8 * eps * (np.abs(mean) + std))
        assert np.all(np.abs(rv - var) <= 8 * eps * var)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [((8, 3, 4, 5), 1), ((8, 4, 5, 3), -1), ((9, 4), 1)],
                         ids=["NCHW", "NHWC", "NC"])
@pytest.mark.parametrize("data_rank", [0, 2])
def test_all_data_on_one_rank_is_batchnorm_bit_for_bit(case, dtype, data_rank):
    shape, axis = case
    C = shape[axis]
    x = data(shape, axis, dtype)
    g = data(shape, axis, dtype, seed=7)
    empty = x[:0]

    def rank(comm):
        m = make_module(C, dtype, axis, comm, momentum=None)
        mine = comm.rank == data_rank
        outs = [train_step(m, x if mine else empty, g if mine else empty[:0] + 0)
                for _ in range(2)]
        return outs, snapshot(m)

    res = ok(run_ranks(3, rank))
    bn = make_module(C, dtype, axis, None, cls=cbn.BatchNorm, momentum=None)
    ref = [train_step(bn, x, g) for _ in range(2)]
    for r, (outs, snap) in enumerate(res):
        for (y, dx), (y_bn, dx_bn) in zip(outs, ref):
            if r == data_rank:
                assert np.array_equal(y, y_bn) and np.array_equal(dx, dx_bn)
            else:
                assert y.shape == dx.shape == empty.shape
        nbt, state, gw, gb = snap
        bn_snap = snapshot(bn)
        assert nbt == bn_snap[0]
        for k in ("running_mean", "running_var", "weight", "bias"):
            assert np.array_equal(state[k], bn_snap[1][k]), k
        if r == data_rank:
            assert np.array_equal(gw, bn.grad_weight) and np.array_equal(gb, bn.grad_bias)
        else:
            assert not gw.any() and not gb.any()


def test_all_data_on_one_rank_is_the_local_stage_composition():
    """The same as the test above one level down, whatever the stages' rounding: with the
    other ranks empty, SyncBatchNorm computes exactly what the stages compute locally
    (merge returns the one non-empty part; the backward sums skip empty ranks)."""
    from cbn import _stages as S
    dtype, axis = np.float32, 1
    x = data((8, 3, 4, 5), axis, dtype)
    g = data((8, 3, 4, 5), axis, dtype, seed=7)

    def rank(comm):
        m = make_module(3, dtype, axis, comm)
        mine = comm.rank == 1
        y, dx = train_step(m, x if mine else x[:0], g if mine else g[:0])
        return y, dx, m.running_mean, m.running_var, m.grad_weight, m.grad_bias

    res = ok(run_ranks(3, rank))
    m = make_module(3, dtype, axis, None, cls=cbn.BatchNorm)
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    stats = S.finish(S.moments(x, axis=axis), m.eps, dtype=dtype, weight=m.weight,
                     bias=m.bias, running_mean=rm, running_var=rv, momentum=m.momentum)
    mean, invstd = stats.save_mean, stats.save_invstd
    y = S.normalize(x, stats, axis=axis)
    sdy, sdyx = S.backward_reduce(g, x, mean, axis=axis)
    dx = S.backward_elements(g, x, m.weight, mean, invstd, sdy, sdyx, x.size // 3,
                             axis=axis)
    expected = (y, dx, rm, rv, (sdyx * invstd.astype(np.float64)).astype(dtype),
                sdy.astype(dtype))
    for got, want in zip(res[1], expected):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    for r in (0, 2):
        assert np.array_equal(res[r][2], rm) and np.array_equal(res[r][3], rv)


def test_communicator_of_size_one_is_batchnorm():
    comm = ThreadCommunicator.create(1)[0]
    x = data((6, 4, 5), 1, np.float32)
    g = data((6, 4, 5), 1, np.float32, seed=2)
    s = make_module(4, np.float32, 1, comm)
    b = make_module(4, np.float32, 1, None, cls=cbn.BatchNorm)
    for m in (s, b):
        m.out = [train_step(m, x, g), train_step(m.eval(), x, g)]
    for (ys, dxs), (yb, dxb) in zip(s.out, b.out):
        assert np.array_equal(ys, yb) and np.array_equal(dxs, dxb)
    assert_same_state(snapshot(s), snapshot(b))
    assert D.communication_time(comm) == 0.0 and _channel(comm).calls == 0


class _Silent:
    """A 2-rank communicator that must not be used."""

    rank, size = 0, 2

    def allgather(self, buf):
        raise AssertionError("eval mode communicated")


def test_eval_does_not_communicate_and_is_batchnorm():
    x = data((6, 4), 1, np.float64)
    g = data((6, 4), 1, np.float64, seed=4)
    s = make_module(4, np.float64, 1, _Silent()).eval()
    b = make_module(4, np.float64, 1, None, cls=cbn.BatchNorm).eval()
    for ms in ((s, b), (s.freeze(), b.freeze())):
        (ys, dxs), (yb, dxb) = (train_step(m, x, g) for m in ms)
        assert np.array_equal(ys, yb) and np.array_equal(dxs, dxb)
    # eval without running statistics: each rank's own batch, as torch.nn.SyncBatchNorm
    s = SyncBatchNorm(4, track_running_stats=False, dtype=np.float64, comm=_Silent()).eval()
    b = cbn.BatchNorm(4, track_running_stats=False, dtype=np.float64).eval()
    assert np.array_equal(s(x), b(x))


# ------------------------------------------------------------------- counts and errors


def test_global_count_of_one_raises_the_same_error_everywhere():
    x = data((1, 4), 1, np.float32)

    def rank(comm):
        m = SyncBatchNorm(4, comm=comm)
        before = snapshot(m)
        try:
            m.forward(x if comm.rank == 1 else x[:0])
        except ValueError as e:
            assert_same_state(before, snapshot(m))
            return str(e)
        return None

    res = ok(run_ranks(3, rank))
    assert all(isinstance(r, str) for r in res), res
    assert len(set(res)) == 1
    assert res[0].startswith("Expected more than 1 value per channel when training")
    assert "(1, 4) (rank 1)" in res[0]


def test_global_empty_batch_returns_empty_and_changes_nothing():
    x = np.zeros((0, 3, 5), np.float32)

    def rank(comm):
        m = make_module(3, np.float32, 1, comm)
        before = snapshot(m)
        y = m.forward(x)
        after = snapshot(m)
        dx = m.backward(np.zeros_like(x))
        return y, dx, before, after, _channel(comm).calls

    for y, dx, before, after, calls in ok(run_ranks(2, rank)):
        assert y.shape == dx.shape == x.shape
        assert_same_state(before, after)
        assert calls == 1                  # the forward's exchange; the backward needs none


def _expect_disagreement(results, *words):
    for r in results:
        assert isinstance(r, CollectiveError), results
        for w in words:
            assert w in str(r), (w, str(r))


@pytest.mark.parametrize("what", ["channels", "dtype", "eps", "momentum", "large_channels"])
def test_ranks_that_disagree_all_raise(what):
    def rank(comm):
        r = comm.rank
        C, dtype, kw = 3, np.float32, {}
        if what == "channels":
            C = 3 + r
        elif what == "large_channels":
            C = 300 + r                       # payload beyond the first block
        elif what == "dtype":
            dtype = (np.float32, np.float64)[r % 2]
        elif what == "eps":
            kw["eps"] = 1e-5 * (1 + r)
        elif what == "momentum":
            kw["momentum"] = None if r else 0.1
        m = SyncBatchNorm(C, dtype=dtype, comm=comm, **kw)
        before = snapshot(m)
        try:
            m.forward(data((4, C), 1, dtype, seed=r))
        finally:
            assert_same_state(before, snapshot(m))

    word = {"channels": "channels", "large_channels": "channels", "dtype": "input dtype",
            "eps": "eps", "momentum": "momentum"}[what]
    _expect_disagreement(run_ranks(2, rank), word)


def test_call_sequence_disagreement_raises_then_recovers():
    x = data((6, 3), 1, np.float32)

    def rank(comm):
        m = SyncBatchNorm(3, comm=comm)
        m.forward(x)
        err = None
        try:
            if comm.rank == 0:
                m.backward(np.ones_like(x))
            else:
                m.forward(x)
        except CollectiveError as e:
            err = e
        # Both ranks made one exchange: they are in step again.
        y = m.forward(x)
        return err, y, m.num_batches_tracked

    res = ok(run_ranks(2, rank))
    _expect_disagreement([r[0] for r in res], "operation", "SyncBatchNorm.backward",
                         "SyncBatchNorm.forward")
    assert all(r[2] == 2 for r in res)
    assert np.array_equal(res[0][1], res[1][1])


def test_a_rank_with_bad_input_raises_its_error_and_the_others_do_not_wait():
    def rank(comm):
        m = SyncBatchNorm(3, comm=comm)
        before = snapshot(m)
        C = 4 if comm.rank == 1 else 3
        try:
            m.forward(data((5, C), 1, np.float32))
        finally:
            assert_same_state(before, snapshot(m))

    res = run_ranks(3, rank)
    assert isinstance(res[1], ValueError) and "expected 3 channels" in str(res[1])
    _expect_disagreement([res[0], res[2]], "rank(s) [1] raised an error")


def test_a_rank_with_bad_grad_output_in_backward():
    x = data((6, 3), 1, np.float32)

    def rank(comm):
        m = SyncBatchNorm(3, comm=comm)
        m.forward(x)
        g = np.ones((5, 3) if comm.rank == 0 else (6, 3), np.float32)
        m.backward(g)

    res = run_ranks(2, rank)
    assert isinstance(res[0], ValueError) and "grad_output has shape (5, 3)" in str(res[0])
    _expect_disagreement([res[1]], "rank(s) [0] raised an error")


def test_wrong_dtype_and_ndim_messages():
    comm = _Silent()
    m = SyncBatchNorm(3, comm=comm)
    with pytest.raises(TypeError, match="float32 parameters but got a float64 input"):
        m.forward(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="expected 2D to 5D input"):
        m.forward(np.zeros(3, np.float32))


# ------------------------------------------------------------------------- variants


def test_large_channel_count_takes_a_second_exchange():
    C = 300
    x = data((10, C), 1, np.float64)
    xs = split(x, (3, 0, 7))

    def rank(comm):
        m = SyncBatchNorm(C, momentum=1.0, dtype=np.float64, comm=comm)
        m.forward(xs[comm.rank])
        return m.running_mean, m.running_var, _channel(comm).calls

    res = ok(run_ranks(3, rank))
    _, mean, var = exact_stats(x, 1)
    np.testing.assert_allclose(res[0][0], mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(res[0][1], var, rtol=1e-13)
    assert res[0][2] == 1


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_tracking_variants(affine, track):
    x = data((8, 3, 4), 1, np.float64)
    g = data((8, 3, 4), 1, np.float64, seed=9)
    xs, gs = split(x, (5, 3)), split(g, (5, 3))

    def rank(comm):
        m = SyncBatchNorm(3, affine=affine, track_running_stats=track, dtype=np.float64,
                          comm=comm)
        y, dx = train_step(m, xs[comm.rank], gs[comm.rank])
        return y, dx, snapshot(m)

    res = ok(run_ranks(2, rank))
    bn = cbn.BatchNorm(3, affine=affine, track_running_stats=track, dtype=np.float64)
    y_bn, dx_bn = train_step(bn, x, g)
    np.testing.assert_allclose(np.concatenate([r[0] for r in res]), y_bn, rtol=1e-13,
                               atol=1e-13)
    np.testing.assert_allclose(np.concatenate([r[1] for r in res]), dx_bn, rtol=1e-12,
                               atol=1e-12)
    if track:
        np.testing.assert_allclose(res[0][2][1]["running_var"], bn.running_var, rtol=1e-13)
    assert (res[0][2][2] is None) == (not affine)


def test_half_inputs_are_computed_in_float32():
    x = data((8, 3, 5), 1, np.float16)
    g = data((8, 3, 5), 1, np.float16, seed=2)
    xs, gs = split(x, (2, 6)), split(g, (2, 6))

    def rank(comm):
        return train_step(SyncBatchNorm(3, comm=comm), xs[comm.rank], gs[comm.rank])

    res = ok(run_ranks(2, rank))
    y_bn, dx_bn = train_step(cbn.BatchNorm(3), x, g)
    y = np.concatenate([r[0] for r in res])
    dx = np.concatenate([r[1] for r in res])
    assert y.dtype == dx.dtype == np.float16
    # one float16 rounding apart at most (values are O(1..10))
    np.testing.assert_allclose(y.astype(np.float32), y_bn.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dx.astype(np.float32), dx_bn.astype(np.float32),
                               rtol=2e-3, atol=2e-2)


# -------------------------------------------------------------- conversion and copies


def test_from_module_shares_arrays_and_settings():
    bn = cbn.BatchNorm2d(4, eps=1e-3, momentum=0.2, dtype=np.float64, axis=-1)
    bn.forward(data((3, 5, 6, 4), -1, np.float64))
    bn.backward(np.ones((3, 5, 6, 4)))
    bn.eval()
    comm = ThreadCommunicator.create(1)[0]
    s = SyncBatchNorm.from_module(bn, comm)
    assert isinstance(s, SyncBatchNorm) and s.comm is comm
    for k in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        assert getattr(s, k) is getattr(bn, k), k
    assert (s.num_features, s.eps, s.momentum, s.affine, s.track_running_stats, s.dtype,
            s.axis, s.training, s.num_batches_tracked) == (
        4, 1e-3, 0.2, True, True, np.float64, -1, False, 1)
    with pytest.raises(ValueError, match="activation"):
        SyncBatchNorm.from_module(cbn.BatchNorm1d(4, activation="relu"), comm)
    with pytest.raises(TypeError, match="cbn.BatchNorm"):
        SyncBatchNorm.from_module(object(), comm)


def test_state_dict_copy_and_pickle():
    comm = ThreadCommunicator.create(1)[0]
    s = make_module(3, np.float32, 1, comm)
    s.forward(data((4, 3), 1, np.float32))
    b = cbn.BatchNorm(3)
    assert list(s.state_dict()) == list(b.state_dict())
    b.load_state_dict(s.state_dict())
    c = copy.deepcopy(s)
    assert c.comm is s.comm and c.running_mean is not s.running_mean
    assert np.array_equal(c.running_mean, s.running_mean)
    p = pickle.loads(pickle.dumps(s))
    assert p._comm is None                      # communicators do not travel
    assert_same_state(snapshot(p), snapshot(s))
    p.comm = comm
    assert p.comm is comm


# --------------------------------------------------------------------- communicators


class FakeMPIComm:
    """mpi4py's buffer interface (Allgather, Get_rank, Get_size) over threads."""

    def __init__(self, inner):
        self.inner = inner

    def Get_rank(self):
        return self.inner.rank

    def Get_size(self):
        return self.inner.size

    def Allgather(self, sendbuf, recvbuf):
        recvbuf[...] = self.inner.allgather(sendbuf).reshape(recvbuf.shape)


def test_mpi_adapter_is_duck_typed():
    x = data((10, 3), 1, np.float64)
    xs = split(x, (4, 6))

    def rank(comm):
        raw = FakeMPIComm(comm)
        a = D.as_communicator(raw)
        assert isinstance(a, D.MPICommunicator) and D.as_communicator(raw) is a
        m = SyncBatchNorm(3, momentum=1.0, dtype=np.float64, comm=raw)
        m.forward(xs[comm.rank])
        return m.running_var

    res = ok(run_ranks(2, rank))
    np.testing.assert_allclose(res[0], exact_stats(x, 1)[2], rtol=1e-13)
    assert np.array_equal(res[0], res[1])


def test_communicator_errors(monkeypatch):
    with pytest.raises(TypeError, match="mpi4py communicator"):
        D.as_communicator(object())

    class Bad:
        rank, size = 2, 2

        def allgather(self, buf):
            return buf

    with pytest.raises(ValueError, match="0 <= rank < size"):
        D.as_communicator(Bad())
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"cbn\[mpi\]"):
        SyncBatchNorm(3)


def test_thread_communicator_times_out_instead_of_hanging():
    comm = ThreadCommunicator.create(2, timeout=0.2)[0]
    with pytest.raises(CollectiveError, match="did not join"):
        comm.allgather(np.zeros(3))


def test_all_reduce_is_a_deterministic_rank_order_sum():
    rng = np.random.default_rng(0)
    vals = [(rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(4))
            for _ in range(3)]

    def rank(comm):
        a, b = (v.copy() for v in vals[comm.rank])
        c, d = (v.copy() for v in vals[comm.rank])
        D.all_reduce([a, b], comm)
        D.all_reduce([c, d], comm, average=True)
        return a, b, c, d

    res = ok(run_ranks(3, rank))
    sa = (vals[0][0].astype(np.float64) + vals[1][0]) + vals[2][0]
    sb = (vals[0][1] + vals[1][1]) + vals[2][1]
    for a, b, c, d in res:
        assert np.array_equal(a, sa.astype(np.float32)) and np.array_equal(b, sb)
        assert np.array_equal(c, (sa / 3).astype(np.float32)) and np.array_equal(d, sb / 3)
    with pytest.raises(TypeError, match="arrays\\[0\\]"):
        D.all_reduce([np.zeros(3, int)], ThreadCommunicator.create(1)[0])

    def mismatch(comm):
        D.all_reduce([np.zeros(3 + comm.rank)], comm)

    _expect_disagreement(run_ranks(2, mismatch), "all_reduce")


# ------------------------------------------------------------------------- PreciseBN


def _batches(seed, sizes, C, loc=1000.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, C, 3)) * 0.5 + loc).astype(dtype) for n in sizes]


def test_precise_statistics_one_process():
    batches = _batches(0, (7, 13, 2, 30, 5), 4)
    m64 = cbn.BatchNorm1d(4, dtype=np.float64)
    m32 = cbn.BatchNorm1d(4)
    idle = cbn.BatchNorm1d(4)
    idle.running_mean[...] = 5
    with cbn.precise_statistics([m64, m32, idle]) as stats:
        for b in batches:
            m64(b)
            m32(b.astype(np.float32))
        m64.eval()
        m64(batches[0] + 100)                   # eval calls are not counted
        m64.train()
    n, mean, var = exact_stats(np.concatenate(batches), 1)
    assert stats.moments[0].count == n == stats.moments[1].count
    assert np.all(np.abs(m64.running_mean - mean) <= 1e-12 * np.abs(mean))
    assert np.all(np.abs(m64.running_var - var) <= 1e-12 * var)
    _, mean32, var32 = exact_stats(np.concatenate(batches).astype(np.float32), 1)
    np.testing.assert_array_max_ulp(m32.running_mean, mean32.astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(m32.running_var, var32.astype(np.float32), maxulp=1)
    assert m64.num_batches_tracked == len(batches)
    assert np.all(idle.running_mean == 5) and stats.moments[2].count == 0
    assert all("forward" not in vars(m) for m in (m64, m32, idle))


def test_precise_statistics_restores_on_exception():
    m = cbn.BatchNorm1d(3, dtype=np.float64)
    twin = cbn.BatchNorm1d(3, dtype=np.float64)
    b = _batches(1, (6,), 3)[0]
    with pytest.raises(KeyError):
        with cbn.precise_statistics(m):
            m(b)
            raise KeyError("boom")
    twin(b)
    assert "forward" not in vars(m)
    assert np.array_equal(m.running_mean, twin.running_mean)   # not the population stats
    assert np.array_equal(m.running_var, twin.running_var)


def test_precise_statistics_argument_errors():
    with pytest.raises(TypeError, match="modules\\[1\\]"):
        cbn.precise_statistics([cbn.BatchNorm1d(3), object()])
    with pytest.raises(ValueError, match="no running statistics"):
        cbn.precise_statistics(cbn.BatchNorm1d(3, track_running_stats=False))
    m = cbn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="more than once"):
        cbn.precise_statistics([m, m])
    with cbn.precise_statistics(m):
        with pytest.raises(ValueError, match="another precise_statistics"):
            with cbn.precise_statistics(m):
                pass
    assert "forward" not in vars(m)


@pytest.mark.parametrize("sync", [False, True], ids=["BatchNorm+comm", "SyncBatchNorm"])
def test_precise_statistics_across_ranks(sync):
    per_rank = [_batches(10 + r, sizes, 4) for r, sizes in
                enumerate([(5, 9, 2), (0, 0, 0), (13, 3, 8)])]

    def rank(comm):
        if sync:
            m = SyncBatchNorm(4, dtype=np.float64, comm=comm)
            with cbn.precise_statistics([m]):
                for b in per_rank[comm.rank]:
                    m(b)
        else:
            m = cbn.BatchNorm1d(4, dtype=np.float64)
            with cbn.precise_statistics([m], comm=comm):
                for b in per_rank[comm.rank]:
                    if len(b):
                        m(b)
        return m.running_mean, m.running_var

    res = ok(run_ranks(3, rank))
    n, mean, var = exact_stats(np.concatenate([b for p in per_rank for b in p]), 1)
    for rm, rv in res:
        assert np.array_equal(rm, res[0][0]) and np.array_equal(rv, res[0][1])
    assert np.all(np.abs(res[0][0] - mean) <= 1e-12 * np.abs(mean))
    assert np.all(np.abs(res[0][1] - var) <= 1e-12 * var)


def test_precise_statistics_failure_on_one_rank_reaches_the_others():
    def rank(comm):
        m = cbn.BatchNorm1d(2, dtype=np.float64)
        with cbn.precise_statistics(m, comm=comm):
            m(np.ones((3, 2)) * comm.rank + np.arange(3)[:, None])
            if comm.rank == 1:
                raise KeyError("local failure")

    res = run_ranks(3, rank)
    assert isinstance(res[1], KeyError)
    _expect_disagreement([res[0], res[2]], "precise_statistics", "rank(s) [1]")


def test_torch_adapter_needs_an_initialized_group():
    dist = pytest.importorskip("torch.distributed")
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.TorchCommunicator()


def test_thread_communicator_arguments():
    with pytest.raises(ValueError, match="size must be >= 1"):
        ThreadCommunicator.create(0)
    with pytest.raises(TypeError, match="size must be an int"):
        ThreadCommunicator.create(2.0)


# ------------------------------------------------- bias=False and unbiased=False (interop)


@pytest.mark.parametrize("bias,unbiased", [(False, True), (True, False), (False, False)])
def test_bias_and_variance_options_match_one_process(bias, unbiased):
    x = data((9, 3, 4), 1, np.float64)
    g = data((9, 3, 4), 1, np.float64, seed=9)
    xs, gs = split(x, (5, 0, 4)), split(g, (5, 0, 4))
    opts = dict(momentum=0.3, dtype=np.float64, bias=bias, unbiased=unbiased)

    def rank(comm):
        m = SyncBatchNorm(3, comm=comm, **opts)
        y, dx = train_step(m, xs[comm.rank], gs[comm.rank])
        D.all_reduce_grads(m)
        return y, dx, snapshot(m), m

    res = ok(run_ranks(3, rank))
    bn = cbn.BatchNorm(3, **opts)
    y_bn, dx_bn = train_step(bn, x, g)
    np.testing.assert_allclose(np.concatenate([r[0] for r in res]), y_bn, rtol=1e-13,
                               atol=1e-13)
    np.testing.assert_allclose(np.concatenate([r[1] for r in res]), dx_bn, rtol=1e-12,
                               atol=1e-12)
    n, mean, var = exact_stats(x, 1)
    expected_rv = 0.7 * 1.0 + 0.3 * (var if unbiased else var * (n - 1) / n)
    for _, _, state, m in res:
        assert list(state[1]) == list(bn.state_dict())
        assert (m.bias is None) == (not bias) and m.unbiased == unbiased
        np.testing.assert_allclose(state[1]["running_var"], expected_rv, rtol=1e-13)
        np.testing.assert_allclose(state[2], bn.grad_weight, rtol=1e-12, atol=1e-12)
        if bias:
            np.testing.assert_allclose(state[3], bn.grad_bias, rtol=1e-12, atol=1e-12)
        else:
            assert state[3] is None                    # no bias, no gradient for it


def test_biased_variance_on_one_rank_is_batchnorm_bit_for_bit():
    x = data((7, 4, 5), 1, np.float32)

    def rank(comm):
        m = make_module(4, np.float32, 1, comm, unbiased=False)
        m.forward(x if comm.rank == 1 else x[:0])
        return m.running_var

    res = ok(run_ranks(2, rank))
    bn = make_module(4, np.float32, 1, None, cls=cbn.BatchNorm, unbiased=False)
    bn.forward(x)
    assert np.array_equal(res[0], bn.running_var) and np.array_equal(res[1], bn.running_var)


def test_from_module_keeps_bias_and_variance_options():
    bn = cbn.BatchNorm2d(4, dtype=np.float64, bias=False, unbiased=False)
    s = SyncBatchNorm.from_module(bn, ThreadCommunicator.create(1)[0])
    assert s.bias is None and s.unbiased is False
    assert repr(s).replace("SyncBatchNorm", "BatchNorm2d") == repr(bn)


def test_converters_build_sync_modules():
    weights = [np.array([1.0, 2.0]), np.array([0.1, -0.1]), np.array([1.0, 4.0])]  # no beta
    config = {"center": False, "momentum": 0.9}
    comm = ThreadCommunicator.create(1)[0]
    s = SyncBatchNorm.from_module(cbn.BatchNorm.from_keras(weights, config), comm)
    assert s.bias is None and not s.unbiased and s.momentum == 0.1 and s.axis == -1
    back, back_config = s.to_keras()
    assert back_config["center"] is False
    assert all(np.array_equal(a, b) for a, b in zip(back, weights))
    pytest.importorskip("mpi4py")               # comm=None: MPI.COMM_WORLD
    direct = SyncBatchNorm.from_keras(weights, config)
    assert isinstance(direct, SyncBatchNorm)
    assert repr(direct) == repr(s) and direct.state_dict().keys() == s.state_dict().keys()


def test_precise_statistics_follow_the_variance_convention():
    batches = _batches(3, (6, 11, 4), 3)
    m = cbn.BatchNorm1d(3, dtype=np.float64, unbiased=False)
    with cbn.precise_statistics(m):
        for b in batches:
            m(b)
    n, mean, var = exact_stats(np.concatenate(batches), 1)
    assert np.all(np.abs(m.running_mean - mean) <= 1e-12 * np.abs(mean))
    assert np.all(np.abs(m.running_var - var * (n - 1) / n) <= 1e-12 * var)
