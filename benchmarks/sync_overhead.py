"""SyncBatchNorm's overhead over BatchNorm: a training forward + backward on every rank.

    mpiexec -n 2 python benchmarks/sync_overhead.py
    mpiexec -n 4 python benchmarks/sync_overhead.py --shape 8x64x28x28 --repeat 50

Each rank times BatchNorm and SyncBatchNorm (cbn.distributed.measure_overhead) on its own
batch of the given shape; rank 0 prints the medians of every rank. With more ranks than
free cores the collectives wait for descheduled ranks and the figures say little.
(asv imports every module of this folder while discovering benchmarks: this one defines
none and does nothing on import.)
"""

import argparse
import sys


def main(argv=None):
    import numpy as np

    from cbn import distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="32x64x28x28", help="this rank's batch, NCHW")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split("x"))
    comm = distributed.as_communicator(None)
    r = distributed.measure_overhead(shape, comm, dtype=np.dtype(args.dtype),
                                     repeat=args.repeat)
    rows = comm.allgather(np.array([r["batchnorm"], r["sync"], r["comm"]]))
    if comm.rank == 0:
        print(f"{comm.size} ranks, {args.shape} {args.dtype} per rank, training forward + "
              "backward, medians of", args.repeat)
        print("rank  BatchNorm ms  SyncBatchNorm ms  ratio  in collectives ms")
        for i, (bn, sync, c) in enumerate(rows):
            print(f"{i:4d}  {bn * 1e3:12.3f}  {sync * 1e3:16.3f}  {sync / bn:5.2f}  "
                  f"{c * 1e3:17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
