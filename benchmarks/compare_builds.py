"""Compare builds of cbn (other checkouts, other build flags) case by case, one thread.

    python benchmarks/compare_builds.py OLD_TREE NEW_TREE [--rounds 3]

Each tree is a source checkout with its extension built in place. Every round runs each
build in its own fresh process (alternating, so drifting machine load hits them alike) and
records the fastest and the median of many calls per case; the table shows, per case, the
fastest over the rounds and NEW/OLD. Forwards write into `out=`. (asv imports every module
of this folder while discovering benchmarks: this one defines none and does nothing on
import.)
"""

import argparse
import json
import math
import subprocess
import sys

CASES = [((32, 64, 56, 56), 1, "float32"), ((32, 56, 56, 64), -1, "float32"),
         ((64, 128, 28, 28), 1, "float64"), ((16, 256, 14, 14), 1, "float32"),
         ((16, 14, 14, 256), -1, "float32"), ((8, 3, 224, 224), 1, "float32"),
         ((256, 1024), 1, "float32"), ((256, 1024), 1, "float64"),
         ((4, 32, 16, 32, 32), 1, "float32"), ((8, 16), 1, "float32"),
         ((2, 8, 4, 4), 1, "float64"), ((64, 32), 1, "float32")]

CHILD = r'''
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import cbn
res = {}
for shape, axis, dt in json.loads(sys.argv[2]):
    x = np.random.default_rng(0).standard_normal(shape).astype(dt)
    C = shape[axis]
    rm, rv = np.zeros(C, dt), np.ones(C, dt)
    w, b = np.ones(C, dt), np.zeros(C, dt)
    y = np.empty_like(x)
    g = np.random.default_rng(1).standard_normal(shape).astype(dt)
    _, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis=axis)
    reps = max(7, min(300, int(3e7 / x.nbytes)))
    ops = {"train": lambda: cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5,
                                                   axis=axis, out=y, n_threads=1),
           "eval": lambda: cbn.batch_norm(x, rm, rv, w, b, training=False, axis=axis,
                                          out=y, n_threads=1),
           "bwd": lambda: cbn.batch_norm_backward(g, x, w, sm, si, True, axis=axis,
                                                  n_threads=1)}
    for name, f in ops.items():
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        ts.sort()
        key = "x".join(map(str, shape)) + (" nhwc" if axis == -1 else "") + f" {dt} {name}"
        res[key] = [ts[0] * 1e6, ts[len(ts) // 2] * 1e6]
print(json.dumps(res))
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    cases = json.dumps([list(c) for c in CASES])
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            out = subprocess.run([sys.executable, "-c", CHILD, getattr(args, which), cases],
                                 capture_output=True, text=True, check=True).stdout
            runs[which].append(json.loads(out))
    print("| case | op | old (us) | new (us) | new / old |\n| --- | --- | ---: | ---: | ---: |")
    ratios = []
    for key in runs["old"][0]:
        o = min(r[key][0] for r in runs["old"])
        n = min(r[key][0] for r in runs["new"])
        ratios.append(n / o)
        case, op = key.rsplit(" ", 1)
        print(f"| {case} | {op} | {o:.1f} | {n:.1f} | {n / o:.2f} |")
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"\ngeometric mean of new / old over {len(ratios)} rows: {geo:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
