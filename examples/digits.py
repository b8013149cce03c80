"""Handwritten digits with an MLP, with and without BatchNorm1d (scikit-learn's bundled
``load_digits``: 1797 8x8 images, no download).

Network: 64 -> 128 -> 64 -> 10, each hidden layer ``Linear -> BatchNorm1d -> ReLU`` (the
Linear layers drop their bias when BN follows, since BN's own bias replaces it) or
``Linear -> ReLU`` without BN; softmax cross-entropy, Adam, mini-batches of 32. Test accuracy
(eval mode, a stratified 25 % hold-out) is printed after every epoch.

    python examples/digits.py            # 10 epochs
    python examples/digits.py --quick    # 3 epochs

Needs scikit-learn (``pip install scikit-learn``) for the data set only.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # find _mlp when run through runpy or importlib too
    sys.path.insert(0, _HERE)
from _mlp import Adam, Linear, batches, cross_entropy, relu, relu_backward  # noqa: E402

import cbn  # noqa: E402

HIDDEN = (128, 64)
BATCH_SIZE = 32
LR = 3e-3
EPOCHS = 10
QUICK_EPOCHS = 3


def load_data(seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): pixels scaled to [0, 1], float32."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("examples/digits.py needs scikit-learn for its data set: "
                         "pip install scikit-learn (or pip install 'cbn[examples]')") from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return tuple(train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                  stratify=digits.target))


class MLP:
    """Linear [-> BatchNorm1d] -> ReLU hidden layers, then a Linear classifier."""

    def __init__(self, sizes: Sequence[int], batch_normalization: bool,
                 rng: np.random.Generator) -> None:
        self.do_bn = batch_normalization
        self.linears: List[Linear] = []
        self.bns: List[cbn.BatchNorm1d] = []
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
            self.linears.append(Linear(n_in, n_out, rng, bias=not self.do_bn))
            if self.do_bn:
                self.bns.append(cbn.BatchNorm1d(n_out))
        self.head = Linear(sizes[-2], sizes[-1], rng)
        self._acts: List[np.ndarray] = []

    def train(self, mode: bool = True) -> "MLP":
        for bn in self.bns:
            bn.train(mode)
        return self

    def eval(self) -> "MLP":
        return self.train(False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._acts = []
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if self.do_bn:
                x = self.bns[i](x)
            x = relu(x)
            self._acts.append(x)
        return self.head(x)

    def backward(self, grad_logits: np.ndarray) -> None:
        g = self.head.backward(grad_logits)
        for i in reversed(range(len(self.linears))):
            g = relu_backward(g, self._acts[i])
            if self.do_bn:
                g = self.bns[i].backward(g)
            g = self.linears[i].backward(g)

    def step(self, opt: Adam) -> None:
        pairs = []
        for layer in self.linears + [self.head]:
            pairs += layer.params_and_grads()
        for bn in self.bns:
            pairs += [(bn.weight, bn.grad_weight), (bn.bias, bn.grad_bias)]
        opt.step(pairs)
        for bn in self.bns:
            bn.zero_grad()

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        self.eval()
        acc = float(np.mean(self.forward(x).argmax(axis=1) == y))
        self.train()
        return acc


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Train with and without BN; returns ``{"accuracy": {"bn": [...], "no_bn": [...]},
    "final_bn": float, "final_no_bn": float, "epochs": n}`` (test accuracy per epoch)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs")
    args = p.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else EPOCHS)
    if epochs < 1:
        p.error("--epochs must be >= 1")

    train_x, test_x, train_y, test_y = load_data(args.seed)
    sizes = (train_x.shape[1],) + HIDDEN + (10,)
    print(f"digits: {len(train_x)} training and {len(test_x)} test images; MLP "
          f"{' -> '.join(map(str, sizes))}, Adam lr {LR}, batch {BATCH_SIZE}, {epochs} epochs")
    rng = np.random.default_rng(args.seed)
    nets = {"no_bn": MLP(sizes, False, rng), "bn": MLP(sizes, True, rng)}
    opts = {k: Adam(lr=LR) for k in nets}
    accuracy: Dict[str, List[float]] = {k: [] for k in nets}
    for epoch in range(epochs):
        for idx in batches(len(train_x), BATCH_SIZE, rng):
            if len(idx) < 2:                 # BN needs more than one value per channel
                continue
            for k, net in nets.items():
                _, grad = cross_entropy(net.forward(train_x[idx]), train_y[idx])
                net.backward(grad)
                net.step(opts[k])
        for k, net in nets.items():
            accuracy[k].append(net.accuracy(test_x, test_y))
        print(f"epoch {epoch:2d}: test accuracy  without BN {accuracy['no_bn'][-1]:.4f}   "
              f"with BN {accuracy['bn'][-1]:.4f}")
    result = {"accuracy": accuracy, "final_bn": accuracy["bn"][-1],
              "final_no_bn": accuracy["no_bn"][-1], "epochs": epochs}
    print(f"final test accuracy: without BN {result['final_no_bn']:.4f}, "
          f"with BN {result['final_bn']:.4f}")
    return result


if __name__ == "__main__":
    main()
