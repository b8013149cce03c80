"""SyncBatchNorm through torch.distributed (gloo on 127.0.0.1).

Started by tests/test_distributed_mpi.py as WORLD_SIZE processes with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment. Each rank checks its part of the output and
the running statistics against cbn.BatchNorm on the concatenated batch (every rank makes
the whole batch from the same seed), with the communicator given both as the process group
and as cbn.distributed.TorchCommunicator; prints "rank R: ok".
"""

from __future__ import annotations

import datetime
import os
import sys

import numpy as np
import torch.distributed as dist

import cbn
from cbn import distributed as D


def main():
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=30))
    try:
        sizes = [2 + 3 * r for r in range(size)]
        edges = np.cumsum([0] + sizes)
        rng = np.random.default_rng(0)
        x = (rng.standard_normal((edges[-1], 3, 4)) * 2 + 5).astype(np.float32)
        g = rng.standard_normal(x.shape).astype(np.float32)
        mine = slice(edges[rank], edges[rank + 1])
        for comm in (dist.group.WORLD, D.TorchCommunicator()):
            m = cbn.SyncBatchNorm(3, comm=comm)
            bn = cbn.BatchNorm1d(3)
            y, y_bn = m(x[mine]), bn(x)[mine]
            dx, dx_bn = m.backward(g[mine]), bn.backward(g)[mine]
            tol = 8 * np.finfo(np.float32).eps * 20
            assert np.abs(y - y_bn).max() <= tol, np.abs(y - y_bn).max()
            assert np.abs(dx - dx_bn).max() <= tol, np.abs(dx - dx_bn).max()
            np.testing.assert_array_max_ulp(m.running_var, bn.running_var, maxulp=1)
            bad = cbn.SyncBatchNorm(3 + rank, comm=comm)
            try:
                bad(np.ones((2, 3 + rank), np.float32))
            except D.CollectiveError as e:
                assert "channels" in str(e)
            else:
                raise AssertionError("no CollectiveError")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: gloo's threads sometimes abort there
    # ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    os._exit(0)
