"""SyncBatchNorm's overhead over BatchNorm: a training forward + backward on every rank.

    mpiexec -n 2 python benchmarks/sync_overhead.py
    python -m cbn bench --sync-ranks 2,4        (the same, launched for each rank count)
    mpiexec -n 4 python benchmarks/sync_overhead.py --shape 8x64x28x28 --repeat 50

Each rank times BatchNorm and SyncBatchNorm (cbn.distributed.measure_overhead) on its own
batch of the given shape; rank 0 prints the medians of every rank. With more ranks than
free cores the collectives wait for descheduled ranks and the figures say little.
(asv imports every module of this folder while discovering benchmarks: this one defines
none and does nothing on import.)
"""

import sys


def main(argv=None):
    from cbn.distributed import _overhead_main
    return _overhead_main(argv)


if __name__ == "__main__":
    sys.exit(main())
