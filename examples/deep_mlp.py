"""A 100-layer MLP with and without batch normalization (seed notebooks 000 and 003).

Each layer is ``Linear(256, 256, bias=False) -> BatchNorm1d(256) -> ReLU`` on a batch of 16
random normal inputs; the script prints the standard deviation of every layer's output.
With BN the std stays near sqrt(1/2 - 1/(2 pi)) ~ 0.58 (the std of ReLU(N(0, 1))) at every
depth, whatever the linear weights' initialization (PyTorch's default uniform
+-1/sqrt(fan_in), or Kaiming-normal). Without BN and with the default init every layer
multiplies the variance by about 1/6 and the signal vanishes; Kaiming-normal init keeps it
alive without BN, which is what that init is designed for.

    python examples/deep_mlp.py            # per-layer std, four configurations
    python examples/deep_mlp.py --quick    # the same experiment, a summary every 10 layers
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # find _mlp when run through runpy or importlib too
    sys.path.insert(0, _HERE)
from _mlp import init_weight, relu  # noqa: E402

import cbn  # noqa: E402

CONFIGS = (("bn", "default"), ("bn", "kaiming"), ("no_bn", "default"), ("no_bn", "kaiming"))


def layer_stds(x: np.ndarray, n_layers: int, width: int, *, use_bn: bool, init: str,
               rng: np.random.Generator) -> List[float]:
    """Forward ``x`` through ``n_layers`` of Linear(no bias) [-> BatchNorm1d] -> ReLU in
    training mode and return the std (unbiased, over all values) of each layer's output."""
    stds = []
    for _ in range(n_layers):
        w = init_weight((width, width), rng, init).astype(np.float32)
        x = x @ w.T
        if use_bn:
            x = cbn.BatchNorm1d(width)(x)
        x = relu(x)
        stds.append(float(np.std(x, ddof=1, dtype=np.float64)))
    return stds


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the experiment; returns ``{"bn_default": [std per layer], "bn_kaiming": ...,
    "no_bn_default": ..., "no_bn_kaiming": ..., "layers": n, ...}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="print a summary every 10 layers instead of every layer")
    args = p.parse_args(argv)
    if args.layers < 1 or args.width < 1 or args.batch_size < 2:
        p.error("--layers and --width must be >= 1, --batch-size >= 2")

    rng = np.random.default_rng(args.seed)
    inputs = rng.standard_normal((args.batch_size, args.width)).astype(np.float32)
    result: Dict[str, object] = {"layers": args.layers, "width": args.width,
                                 "batch_size": args.batch_size}
    every = 10 if args.quick else 1
    for index, (bn_key, init) in enumerate(CONFIGS):
        key = f"{bn_key}_{init}"
        stds = layer_stds(inputs, args.layers, args.width, use_bn=bn_key == "bn", init=init,
                          rng=np.random.default_rng([args.seed, index]))
        result[key] = stds
        title = "with BatchNorm1d" if bn_key == "bn" else "without BN"
        print(f"\n--- {title}, {init} init of the Linear weights")
        for i, s in enumerate(stds):
            if i % every == 0 or i == len(stds) - 1:
                print(f"layers:{i}, std:{s:.6g}")
        print(f"min std {min(stds):.4g}, max std {max(stds):.4g}")
    return result


if __name__ == "__main__":
    main()
