"""``python -m cbn``: build info, a self-check against the NumPy reference, a speed table.

Sub-commands:

    python -m cbn            build info, self-check, short speed table against NumPy
    python -m cbn bench ...  the full one-process comparison (see benchmarks/compare.py)
    python -m cbn demo       the seed experiments in a short form (needs the source tree)
"""

from __future__ import annotations

import os
import platform
import runpy
import sys
from pathlib import Path

import numpy as np

import cbn
from cbn import _reference


def build_info() -> str:
    return (f"cbn {cbn.__version__}  (numpy {np.__version__}, Python {platform.python_version()}, "
            f"{platform.machine()})\n"
            f"OpenMP: {'on' if cbn.openmp_enabled() else 'off (serial kernels)'}; "
            f"threads: {cbn.get_num_threads()} (os.cpu_count() = {os.cpu_count()})")


def self_check(seed: int = 0) -> list[str]:
    """Compare cbn with the float64 NumPy reference on a few layouts; returns failures."""
    rng = np.random.default_rng(seed)
    failures = []
    cases = [((8, 16), 1), ((4, 6, 40), 1), ((2, 5, 12, 12), 1), ((2, 12, 12, 5), -1),
             ((2, 3, 4, 5, 6), 1)]
    for shape, axis in cases:
        for dtype in (np.float32, np.float64):
            tol = 50 * np.finfo(dtype).eps * 10
            x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
            C = shape[axis]
            w, b = rng.standard_normal(C), rng.standard_normal(C)
            g = rng.standard_normal(shape).astype(dtype)
            rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
            rm_ref, rv_ref = rm.copy(), rv.copy()
            for training in (True, False):
                got = cbn.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5, axis=axis)
                ref = _reference.batch_norm_forward(x, w, b, rm_ref, rv_ref, training, 0.1,
                                                    1e-5, axis=axis)
                dgot = cbn.batch_norm_backward(g, x, w, got[1], got[2], training, axis=axis)
                dref = _reference.batch_norm_backward(g, x, w, ref[1], ref[2], training,
                                                      axis=axis)
                pairs = list(zip(got, ref)) + list(zip(dgot, dref)) + [(rm, rm_ref), (rv, rv_ref)]
                err = max(float(np.max(np.abs(a - r)) / max(1.0, float(np.max(np.abs(r)))))
                          for a, r in pairs)
                if not err <= tol:
                    failures.append(f"{shape} axis={axis} {np.dtype(dtype).name} "
                                    f"training={training}: max relative error {err:.3g}")
    return failures


def _examples_dir() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / "examples" / "deep_mlp.py").is_file():
            return base / "examples"
    return None


def demo() -> int:
    where = _examples_dir()
    if where is None:
        print("python -m cbn demo runs the scripts in examples/ of the source tree; "
              "run it from a checkout of cbn.", file=sys.stderr)
        return 2
    for name in ("deep_mlp.py", "bad_init_regression.py"):
        print(f"\n=== examples/{name} --quick")
        sys.argv = [name, "--quick"]
        runpy.run_path(str(where / name), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from cbn import _bench
        return _bench.main(argv[1:]) or 0
    if argv[:1] == ["demo"]:
        return demo()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv:
        print(f"unknown command {argv[0]!r}\n{__doc__}", file=sys.stderr)
        return 2
    print(build_info())
    failures = self_check()
    if failures:
        print("self-check against the NumPy reference FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("self-check against the NumPy reference (2D..5D, both dtypes, both layouts, "
          "forward and backward): ok")
    from cbn import _bench
    _bench.speed_table(quick=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
