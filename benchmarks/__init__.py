"""asv benchmark suite for cbn (see asv.conf.json and docs/performance.md).

common.py       shapes, parameters, cached input data (cbn/_benchdata.py, the recipe the
                bench uses too), the timing harness (cbn/_timing.py)
bench_forward   training and eval forward, cbn vs the NumPy reference (cbn on 1 thread)
bench_backward  training-mode backward (1 thread)
bench_threads   forward and backward on CBN_ASV_MULTI_THREADS threads (default 2)
bench_modules   cbn.BatchNorm1d/2d/3d module calls (1 thread)
bench_memory    peak memory: cbn allocates nothing beyond its output
bench_overhead  per-call overhead on tiny inputs
bench_ratios    track_cbn_over_*: cbn time / NumPy or copy time, measured inside (lower
                is better)
compare.py      not an asv benchmark: the one-process comparison script
compare_builds  not an asv benchmark: two builds of cbn, case by case
asv_offline.py  not an asv benchmark: the published dashboard without internet
"""
