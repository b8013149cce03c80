"""asv benchmark suite for cbn (see asv.conf.json and docs/performance.md).

common.py       shapes, parameters and cached input data
bench_forward   training and eval forward, cbn vs the NumPy reference
bench_backward  training-mode backward
bench_modules   cbn.BatchNorm1d/2d/3d module calls
bench_memory    peak memory: cbn allocates nothing beyond its output
bench_speedup   track_speedup_*: NumPy time / cbn time, measured inside
compare.py      not an asv benchmark: the one-process comparison script
"""
