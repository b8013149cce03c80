"""One-process speed comparison: cbn vs copy, NumPy, PyTorch, ONNX Runtime.

A thin wrapper: the code lives in the package (``cbn/_bench.py``) so that
``python -m cbn bench`` runs the same thing from an installed cbn. Examples::

    python benchmarks/compare.py --quick
    python benchmarks/compare.py --threads 1 --dtype float32 --json compare.json
    python benchmarks/compare.py --case 32x64x56x56 --layout channels_last --op train --threads 1,2

See ``python benchmarks/compare.py --help`` and docs/performance.md.
(asv imports every module of this folder while discovering benchmarks: this one defines
none and does nothing on import.)
"""

import sys


def main(argv=None):
    from cbn._bench import main as bench_main
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
