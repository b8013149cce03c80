"""SyncBatchNorm, precise_statistics and the disagreement errors over real MPI processes.

Run by tests/test_distributed_mpi.py as ``mpiexec -n N python tests/mpi/sync_check.py MODE``
(MODE: ``general`` or ``exact``). Every rank generates the whole data set from the same
seed, so each can check its results against one process (cbn.BatchNorm on the concatenated
batch) and against float64 statistics computed here with math.fsum. A failing check prints
its traceback and aborts every rank (comm.Abort), so no rank is left waiting; a rank that
passes prints "rank R: ok".
"""

from __future__ import annotations

import math
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

import cbn
from cbn import distributed as D


def data(shape, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    cs = (1, C) + (1,) * (len(shape) - 2)
    return (rng.standard_normal(shape) * rng.uniform(0.5, 2, C).reshape(cs)
            + loc + rng.uniform(-3, 3, C).reshape(cs))


def exact_stats(x):
    xm = np.moveaxis(np.asarray(x, np.float64), 1, -1).reshape(-1, x.shape[1])
    n = xm.shape[0]
    mean = np.array([math.fsum(c) / n for c in xm.T])
    m2 = np.array([math.fsum((c - mu) ** 2) for c, mu in zip(xm.T, mean)])
    return n, mean, m2 / (n - 1)


def parts(x, sizes, rank):
    edges = np.cumsum([0] + list(sizes))
    return x[edges[rank]:edges[rank + 1]]


def same_on_every_rank(comm, *arrays):
    for a in arrays:
        for other in comm.allgather(a):
            assert np.array_equal(other, a), "ranks hold different statistics"


def expect(exc_type, fn, *words):
    try:
        fn()
    except exc_type as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return str(e)
    raise AssertionError(f"expected {exc_type.__name__}")


def check_general(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    # uneven batches, one rank empty when there are more than two
    sizes = [3 + 2 * r for r in range(size)]
    if size > 2:
        sizes[1] = 0
    N = sum(sizes)
    x = data((N, 4, 3, 5), 0).astype(np.float32)
    g = data((N, 4, 3, 5), 1).astype(np.float32)
    m = cbn.SyncBatchNorm(4, momentum=0.2, comm=comm)
    bn = cbn.BatchNorm2d(4, momentum=0.2)
    for _ in range(2):
        y = m(parts(x, sizes, rank))
        dx = m.backward(parts(g, sizes, rank))
        y_bn = parts(bn(x), sizes, rank)
        dx_bn = parts(bn.backward(g), sizes, rank)
        scale = 8 * np.finfo(np.float32).eps * (1 + np.abs(x).max())
        assert np.all(np.abs(y - y_bn) <= scale), "y differs from one process"
        gscale = 8 * np.finfo(np.float32).eps * (1 + np.abs(g).max()) * (1 + np.abs(x).max())
        assert np.all(np.abs(dx - dx_bn) <= gscale), "dx differs from one process"
    same_on_every_rank(comm, m.running_mean, m.running_var)
    np.testing.assert_array_max_ulp(m.running_mean, bn.running_mean, maxulp=1)
    np.testing.assert_array_max_ulp(m.running_var, bn.running_var, maxulp=1)
    D.all_reduce_grads(m)
    np.testing.assert_allclose(m.grad_bias, bn.grad_bias, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(m.grad_weight, bn.grad_weight, rtol=1e-4, atol=1e-3)

    # float64 statistics on hard data (mean 1000, std ~1), exact to 1e-13
    h = data((N, 3, 7), 2, loc=1000.0)
    m64 = cbn.SyncBatchNorm(3, momentum=1.0, dtype=np.float64, comm=comm)
    m64(parts(h, sizes, rank))
    _, mean, var = exact_stats(h)
    assert np.all(np.abs(m64.running_mean - mean) <= 1e-13 * np.abs(mean))
    assert np.all(np.abs(m64.running_var - var) <= 1e-13 * var)

    # PreciseBN over several uneven batches per rank
    batches = [data((n, 3, 7), 10 + rank * 7 + i, loc=1000.0) for i, n in
               enumerate([2 + rank, 5, 3 * rank])]
    p = cbn.SyncBatchNorm(3, dtype=np.float64, comm=comm)
    with cbn.precise_statistics([p]):
        for b in batches:
            p(b)
    everything = np.concatenate([b for bs in comm.allgather(batches) for b in bs])
    _, mean, var = exact_stats(everything)
    same_on_every_rank(comm, p.running_mean, p.running_var)
    assert np.all(np.abs(p.running_mean - mean) <= 1e-12 * np.abs(mean))
    assert np.all(np.abs(p.running_var - var) <= 1e-12 * var)

    # a global count of one value per channel: the same ValueError everywhere
    one = cbn.SyncBatchNorm(4, comm=comm)
    msg = expect(ValueError, lambda: one(x[:1, :, :1, :1] if rank == size - 1 else x[:0]),
                 "Expected more than 1 value per channel")
    assert len(set(comm.allgather(msg))) == 1 and one.num_batches_tracked == 0

    # ranks that disagree all raise, nobody hangs
    bad = cbn.SyncBatchNorm(3 + (rank == 0), comm=comm)
    expect(D.CollectiveError, lambda: bad(x[:4, :3 + (rank == 0), 0, 0]), "channels")
    big = cbn.SyncBatchNorm(300 + rank, comm=comm)
    expect(D.CollectiveError, lambda: big(np.ones((2, 300 + rank), np.float32)), "channels")
    # a rank with a bad input raises its own error, the others a CollectiveError
    if rank == 0:
        expect(ValueError, lambda: m(x[:4, :3]), "expected 4 channels")
    else:
        expect(D.CollectiveError, lambda: m(parts(x, sizes, rank)), "rank(s) [0]")
    # and they are still in step
    y = m(parts(x, sizes, rank))
    same_on_every_rank(comm, m.running_var)


def check_exact(comm):
    """All data on the last rank, the others empty: BatchNorm's results bit for bit."""
    rank, size = comm.Get_rank(), comm.Get_size()
    x = data((6, 4, 3, 5), 0).astype(np.float32)
    g = data((6, 4, 3, 5), 1).astype(np.float32)
    mine = rank == size - 1
    m = cbn.SyncBatchNorm(4, momentum=None, comm=comm)
    bn = cbn.BatchNorm2d(4, momentum=None)
    for _ in range(2):
        y = m(x if mine else x[:0])
        dx = m.backward(g if mine else g[:0])
        y_bn, dx_bn = bn(x), bn.backward(g)
        if mine:
            assert np.array_equal(y, y_bn) and np.array_equal(dx, dx_bn)
    assert np.array_equal(m.running_mean, bn.running_mean)
    assert np.array_equal(m.running_var, bn.running_var)
    if mine:
        assert np.array_equal(m.grad_weight, bn.grad_weight)
        assert np.array_equal(m.grad_bias, bn.grad_bias)


if __name__ == "__main__":
    comm = MPI.COMM_WORLD
    try:
        {"general": check_general, "exact": check_exact}[sys.argv[1]](comm)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
        os._exit(1)
    print(f"rank {comm.Get_rank()}: ok", flush=True)
