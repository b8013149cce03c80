"""SyncBatchNorm's overhead over BatchNorm, timed on every rank (``python -m
cbn.distributed`` under mpiexec). (Part of :mod:`cbn.distributed`.)"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import DTypeLike

from ..modules import BatchNorm
from ._adapters import as_communicator
from ._exchange import _channel
from ._sync import SyncBatchNorm

__all__ = ["measure_overhead"]

# ------------------------------------------------------------------------------ overhead


def measure_overhead(shape: Sequence[int] = (32, 64, 28, 28), comm: Any = None, *,
                     dtype: DTypeLike = np.float32, repeat: int = 30,
                     warmup: int = 3) -> Dict[str, float]:
    """Time a training forward + backward of SyncBatchNorm and of BatchNorm on this rank's
    ``shape`` input (collective: run it on every rank). Returns medians in seconds:
    ``{"batchnorm": t_bn, "sync": t_sync, "ratio": t_sync / t_bn, "comm": time in the
    collectives per step}``. Timings on a shared machine are noisy: quote them as rough.

    Examples
    --------
    >>> from cbn.distributed import ThreadCommunicator, measure_overhead
    >>> r = measure_overhead((8, 4, 5), ThreadCommunicator.create(1)[0], repeat=3)
    >>> sorted(r)
    ['batchnorm', 'comm', 'ratio', 'sync']
    >>> r["comm"]                     # a single rank does not communicate
    0.0

    On every rank of an MPI job (``benchmarks/sync_overhead.py`` does this):

    >>> r = measure_overhead((32, 64, 28, 28))                  # doctest: +SKIP
    """
    ch = _channel(comm)
    rng = np.random.default_rng(ch.rank)
    x = rng.standard_normal(tuple(shape)).astype(dtype)
    g = rng.standard_normal(tuple(shape)).astype(dtype)
    C = x.shape[1]
    bn = BatchNorm(C, dtype=dtype)
    sbn = SyncBatchNorm(C, dtype=dtype, comm=ch.comm)

    def med(module) -> Tuple[float, float]:
        ts, cs = [], []
        for i in range(warmup + repeat):
            c0 = ch.seconds
            t0 = time.perf_counter()
            module.forward(x)
            module.backward(g)
            t = time.perf_counter() - t0
            if i >= warmup:
                ts.append(t)
                cs.append(ch.seconds - c0)
        return float(np.median(ts)), float(np.median(cs))

    t_bn, _ = med(bn)
    t_sync, t_comm = med(sbn)
    return {"batchnorm": t_bn, "sync": t_sync, "ratio": t_sync / t_bn, "comm": t_comm}


def _overhead_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cbn.distributed`` under mpiexec: SyncBatchNorm's overhead over BatchNorm
    on every rank (measure_overhead); rank 0 prints the medians. ``python -m cbn bench
    --sync-ranks 2,4`` launches it."""
    import argparse
    p = argparse.ArgumentParser(
        prog="mpiexec -n N python -m cbn.distributed",
        description="SyncBatchNorm's overhead over BatchNorm: a training forward + backward "
                    "on every rank, each on its own batch of --shape.")
    p.add_argument("--shape", default="32x64x28x28", help="this rank's batch, NCHW "
                   "(default 32x64x28x28)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=30, help="timed steps (default 30)")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    comm = as_communicator(None)
    r = measure_overhead(shape, comm, dtype=np.dtype(args.dtype), repeat=args.repeat)
    rows = comm.allgather(np.array([r["batchnorm"], r["sync"], r["comm"]]))
    if comm.rank == 0:
        print(f"{comm.size} ranks, {args.shape} {args.dtype} per rank, training forward + "
              f"backward, medians of {args.repeat}")
        print("rank  BatchNorm us  SyncBatchNorm us  ratio  in collectives us")
        for i, (bn, sync, c) in enumerate(rows):
            print(f"{i:4d}  {bn * 1e6:12.1f}  {sync * 1e6:16.1f}  {sync / bn:5.2f}  "
                  f"{c * 1e6:17.1f}")
    return 0
