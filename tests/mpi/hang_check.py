"""Ranks that disagree in ways no header can carry, over real MPI processes: one rank in eval
mode while the others train, or one that skips a call. The others must raise CollectiveError
once the communicator's timeout has passed, not wait forever; ranks whose settings differ
(``unbiased``) raise at once, on every rank.

Run by tests/test_distributed_mpi.py as ``mpiexec -n N python tests/mpi/hang_check.py MODE
DIR`` (MODE: ``eval``, ``skip`` or ``settings``). Every rank prints "rank R: ok" when it saw
what it should. A timed-out collective stays pending (MPI cannot cancel one), so before the
exit the odd rank joins it (after the others wrote ``DIR/done.R``), and MPI_Finalize is
clean; a failing rank aborts the job.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

import cbn
from cbn.distributed import CollectiveError, MPICommunicator, _exchange

TIMEOUT = 2.0


def main(mode: str) -> MPICommunicator:
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    comm = MPICommunicator(world, timeout=TIMEOUT)
    x = np.random.default_rng(rank).standard_normal((8, 4)).astype(np.float32)
    odd = rank == size - 1                    # the rank that does something else
    if mode == "settings":
        bn = cbn.SyncBatchNorm(4, comm=comm, unbiased=rank == 0)
        t0 = time.monotonic()
        try:
            bn(x)
        except CollectiveError as e:
            assert "settings" in str(e) and "unbiased" in str(e), str(e)
            assert time.monotonic() - t0 < TIMEOUT, "the header should have caught it"
            assert bn.num_batches_tracked == 0
        else:
            raise AssertionError("no CollectiveError")
        return comm
    bn = cbn.SyncBatchNorm(4, comm=comm)
    bn(x)                                      # one step together: all ranks agree
    if odd:
        if mode == "eval":
            bn.eval()
            bn(x)                              # eval: no collective, returns at once
        return comm                            # skip: this rank makes no call at all
    t0 = time.monotonic()
    try:
        bn(x)
    except CollectiveError as e:
        waited = time.monotonic() - t0
        assert "did not join" in str(e), str(e)
        assert TIMEOUT * 0.9 <= waited < TIMEOUT + 30, waited
    else:
        raise AssertionError("no CollectiveError: the rank did not wait for the odd one")
    try:                                       # the communicator is spent for cbn
        bn(x)
    except CollectiveError as e:
        assert "cannot be used" in str(e), str(e)
    else:
        raise AssertionError("a spent communicator was used again")
    return comm


def drain(mode: str, comm: MPICommunicator) -> None:
    """The odd rank, once every other rank has timed out (DIR/done.R files), joins the
    collective they abandoned (non-blocking: a blocking collective does not match those),
    and they wait for it, so that MPI_Finalize is clean."""
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    done = sys.argv[2]
    open(os.path.join(done, f"done.{rank}"), "w").close()
    if mode == "settings":
        return
    if rank != size - 1:
        comm._abandoned[2].Wait()
        return
    deadline = time.monotonic() + 60
    while not all(os.path.exists(os.path.join(done, f"done.{i}")) for i in range(size - 1)):
        if time.monotonic() > deadline:
            raise AssertionError("the other ranks never finished")
        time.sleep(0.02)
    n = _exchange._H + _exchange.FIRST_BLOCK
    world.Iallgather(np.zeros(n), np.empty((size, n))).Wait()


if __name__ == "__main__":
    r = MPI.COMM_WORLD.Get_rank()
    try:
        drain(sys.argv[1], main(sys.argv[1]))
        print(f"rank {r}: ok", flush=True)
    except BaseException:  # noqa: BLE001 -- reported, then every rank is ended
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
