"""``python -m cbn``: build info, a self-check against the NumPy reference, a speed table.

Commands (``python -m cbn COMMAND --help`` describes each):

    python -m cbn            the same as ``python -m cbn check``
    python -m cbn check      build info, self-check, short speed table against NumPy
    python -m cbn bench ...  the full one-process comparison (cbn._bench, benchmarks/compare.py)
    python -m cbn demo ...   the seed experiments of examples/ in their quick form
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from typing import List, Optional, Sequence

import numpy as np

import cbn
from cbn import _reference


def build_info() -> str:
    """cbn.show_config()'s report: version, OpenMP, threads, CPU target, build flags."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cbn.show_config()
    return buf.getvalue().rstrip()


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


#: Sub-commands whose arguments belong to another module: everything after the command's
#: name goes to that module's ``main(argv)``, ``--help`` included.
FORWARDED = {
    "bench": "time cbn against a plain copy, the NumPy reference, PyTorch and ONNX Runtime "
             "(options: python -m cbn bench --help)",
    "demo": "run the seed experiments of examples/ in their quick form "
            "(options: python -m cbn demo --help)",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``check`` (the default) and the forwarded commands."""
    p = argparse.ArgumentParser(
        prog="python -m cbn",
        description="cbn: batch normalization for NumPy arrays on the CPU. Without a command, "
                    "runs 'check'.")
    p.add_argument("--version", action="version", version=f"cbn {cbn.__version__}")
    p.set_defaults(seed=0, no_speed=False)        # 'check''s, for a run without a command
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    check = sub.add_parser(
        "check", help="build info, self-check against the NumPy reference and a short speed "
                      "table (the default)",
        description="Print the build (version, OpenMP, threads), compare the kernels with the "
                    "float64 NumPy reference (2D..5D, float32 and float64, both layouts, "
                    "forward and backward) and print a short speed table against NumPy. "
                    "Exits 1 if the self-check fails.")
    check.add_argument("--seed", type=int, default=0,
                       help="seed of the self-check's random data (default 0)")
    check.add_argument("--no-speed", action="store_true",
                       help="skip the speed table (build info and self-check only)")
    for name, text in FORWARDED.items():
        # Listed here for the help only: main() hands the arguments to the module itself.
        sub.add_parser(name, help=text, add_help=False)
    return p


def check(seed: int = 0, speed: bool = True) -> int:
    """Build info, self-check and (if ``speed``) the short speed table; the exit status."""
    print(build_info())
    failures = self_check(seed)
    if failures:
        print("self-check against the NumPy reference FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("self-check against the NumPy reference (2D..5D, both dtypes, both layouts, "
          "forward and backward): ok")
    if speed:
        from cbn import _bench
        _bench.speed_table(quick=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m cbn``; returns the exit status."""
    words: List[str] = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["bench"]:
        from cbn import _bench
        return _bench.main(words[1:]) or 0
    if words[:1] == ["demo"]:
        from cbn import _demo
        return _demo.main(words[1:])
    args = build_parser().parse_args(words)
    return check(args.seed, speed=not args.no_speed)


if __name__ == "__main__":
    sys.exit(main())
