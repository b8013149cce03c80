"""Batch normalization rescues a badly initialized network (seed notebook 002).

Regression of ``y = x**2 - 5 + noise`` (x in [-7, 10], noise N(0, 2)) by an MLP of
``N_HIDDEN = 8`` layers of 10 units whose weights are N(0, 0.1) and whose biases all start at
``B_INIT = -0.2`` (a bad initialization), trained with Adam (lr 0.03, batch 64) on 2000
samples, with and without BatchNorm1d (momentum 0.5) on the input and after every Linear
layer. Without BN the pre-activations drift to where tanh saturates (or ReLU is dead) and the
network barely learns; with BN it fits the parabola. The test loss (eval mode, 200 test
points) is printed after every epoch.

Everything is NumPy: cbn.BatchNorm1d forward/backward and hand-written Linear, activation,
MSE and Adam (examples/_mlp.py).

    python examples/bad_init_regression.py                      # 12 epochs, tanh
    python examples/bad_init_regression.py --activation relu
    python examples/bad_init_regression.py --quick              # 6 epochs
    python examples/bad_init_regression.py --plot curves.png    # needs matplotlib
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
from _mlp import ACTIVATIONS, Adam, Linear, batches, mse_loss  # noqa: E402

import cbn  # noqa: E402

# The seed notebook's hyper-parameters.
N_SAMPLES = 2000
BATCH_SIZE = 64
EPOCH = 12
LR = 0.03
N_HIDDEN = 8
WIDTH = 10
B_INIT = -0.2
BN_MOMENTUM = 0.5
QUICK_EPOCHS = 6


def make_data(rng: np.random.Generator) -> Tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y), float32 column vectors."""
    x = np.linspace(-7, 10, N_SAMPLES)[:, None]
    y = np.square(x) - 5 + rng.normal(0, 2, x.shape)
    test_x = np.linspace(-7, 10, 200)[:, None]
    test_y = np.square(test_x) - 5 + rng.normal(0, 2, test_x.shape)
    return tuple(a.astype(np.float32) for a in (x, y, test_x, test_y))


class Net:
    """The notebook's ``Net``: [BN on the input] then N_HIDDEN x (Linear [-> BN] -> act),
    then Linear(10, 1). Weights N(0, 0.1), biases B_INIT."""

    def __init__(self, batch_normalization: bool, activation: str,
                 rng: np.random.Generator) -> None:
        self.do_bn = batch_normalization
        self.act, self.act_backward = ACTIVATIONS[activation]
        self.bn_input = cbn.BatchNorm1d(1, momentum=BN_MOMENTUM) if self.do_bn else None
        self.fcs: List[Linear] = []
        self.bns: List[cbn.BatchNorm1d] = []
        for i in range(N_HIDDEN):
            self.fcs.append(self._init(Linear(1 if i == 0 else WIDTH, WIDTH, rng,
                                              init="normal0.1")))
            if self.do_bn:
                self.bns.append(cbn.BatchNorm1d(WIDTH, momentum=BN_MOMENTUM))
        self.predict = self._init(Linear(WIDTH, 1, rng, init="normal0.1"))
        self._acts: List[np.ndarray] = []

    @staticmethod
    def _init(layer: Linear) -> Linear:
        layer.bias.fill(B_INIT)
        return layer

    def _bn_modules(self) -> List[cbn.BatchNorm1d]:
        return ([self.bn_input] + self.bns) if self.do_bn else []

    def train(self, mode: bool = True) -> "Net":
        for bn in self._bn_modules():
            bn.train(mode)
        return self

    def eval(self) -> "Net":
        return self.train(False)

    def forward(self, x: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray], List[np.ndarray]]:
        """(prediction, layer inputs, pre-activations) as in the notebook."""
        pre_activation = [x]
        if self.do_bn:
            x = self.bn_input(x)
        layer_input = [x]
        self._acts = []
        for i in range(N_HIDDEN):
            x = self.fcs[i](x)
            pre_activation.append(x)
            if self.do_bn:
                x = self.bns[i](x)
            x = self.act(x)
            self._acts.append(x)
            layer_input.append(x)
        return self.predict(x), layer_input, pre_activation

    def backward(self, grad_out: np.ndarray) -> None:
        g = self.predict.backward(grad_out)
        for i in reversed(range(N_HIDDEN)):
            g = self.act_backward(g, self._acts[i])
            if self.do_bn:
                g = self.bns[i].backward(g)
            g = self.fcs[i].backward(g)
        if self.do_bn:
            self.bn_input.backward(g)

    def params_and_grads(self) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        pairs = []
        for layer in self.fcs + [self.predict]:
            pairs += layer.params_and_grads()
        for bn in self._bn_modules():
            pairs += [(bn.weight, bn.grad_weight), (bn.bias, bn.grad_bias)]
        return pairs

    def zero_grad(self) -> None:
        for bn in self._bn_modules():
            bn.zero_grad()


def train(epochs: int, activation: str, seed: int, verbose: bool = True
          ) -> Dict[str, object]:
    """Train both networks on the same batches; returns their test losses per epoch and the
    last evaluation's layer inputs and pre-activations (for the histograms)."""
    rng = np.random.default_rng(seed)
    train_x, train_y, test_x, test_y = make_data(rng)
    nets = {"no_bn": Net(False, activation, rng), "bn": Net(True, activation, rng)}
    opts = {k: Adam(lr=LR) for k in nets}
    losses: Dict[str, List[float]] = {k: [] for k in nets}
    snapshots: Dict[str, Tuple[List[np.ndarray], List[np.ndarray]]] = {}

    def evaluate() -> None:
        for k, net in nets.items():
            net.eval()
            pred, layer_input, pre_act = net.forward(test_x)
            losses[k].append(mse_loss(pred, test_y)[0])
            snapshots[k] = (layer_input, pre_act)
            net.train()

    evaluate()
    if verbose:
        print(f"before training: test loss  without BN {losses['no_bn'][-1]:9.3f}   "
              f"with BN {losses['bn'][-1]:9.3f}")
    for epoch in range(epochs):
        for idx in batches(N_SAMPLES, BATCH_SIZE, rng):
            b_x, b_y = train_x[idx], train_y[idx]
            for k, net in nets.items():
                pred, _, _ = net.forward(b_x)
                _, grad = mse_loss(pred, b_y)
                net.zero_grad()
                net.backward(grad)
                opts[k].step(net.params_and_grads())
        evaluate()
        if verbose:
            print(f"epoch {epoch:2d}: test loss  without BN {losses['no_bn'][-1]:9.3f}   "
                  f"with BN {losses['bn'][-1]:9.3f}")
    return {"losses": losses, "snapshots": snapshots}


def plot(path: str, losses: Dict[str, List[float]],
         snapshots: Dict[str, Tuple[List[np.ndarray], List[np.ndarray]]], activation: str
         ) -> None:
    """Loss curves and per-layer histograms of pre-activations and layer inputs, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = N_HIDDEN + 1
    fig = plt.figure(figsize=(2 * ncol, 11))
    grid = fig.add_gridspec(5, ncol, height_ratios=[2.2, 1, 1, 1, 1], hspace=0.6)
    ax = fig.add_subplot(grid[0, :])
    for k, label in (("no_bn", "without BN"), ("bn", "with BN")):
        ax.plot(range(len(losses[k])), losses[k], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("test MSE")
    ax.set_title(f"x^2 - 5 regression, {activation}, all biases initialized to {B_INIT}")
    ax.legend()
    rows = [("no_bn", 1, "pre-act"), ("bn", 1, "BN pre-act"), ("no_bn", 0, "act in"),
            ("bn", 0, "BN act in")]
    for r, (k, which, name) in enumerate(rows, start=1):
        arrays = snapshots[k][which]
        for c in range(ncol):
            a = fig.add_subplot(grid[r, c])
            a.hist(np.ravel(arrays[c]), bins=10, color="#FF9359" if k == "no_bn" else "#74BCFF")
            a.set_yticks([])
            a.tick_params(labelsize=6)
            if r == 1:
                a.set_title("input" if c == 0 else f"layer {c}", fontsize=8)
            if c == 0:
                a.set_ylabel(name, fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the experiment; returns ``{"losses": {"no_bn": [...], "bn": [...]},
    "final_no_bn": float, "final_bn": float, "epochs": n, "activation": str}`` where each
    loss list has the test loss before training and after every epoch."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    p.add_argument("--epochs", type=int, default=None, help=f"default {EPOCH}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs")
    p.add_argument("--plot", metavar="FILE", help="save loss curves and histograms as a PNG")
    args = p.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, which is not installed "
                    "(pip install matplotlib, or pip install 'cbn[examples]')")
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else EPOCH)
    if epochs < 1:
        p.error("--epochs must be >= 1")

    print(f"x^2 - 5 regression, {N_HIDDEN} hidden layers of {WIDTH}, activation "
          f"{args.activation}, biases initialized to {B_INIT}, Adam lr {LR}, {epochs} epochs")
    out = train(epochs, args.activation, args.seed)
    losses = out["losses"]
    if args.plot:
        plot(args.plot, losses, out["snapshots"], args.activation)
        print(f"wrote {args.plot}")
    result = {"losses": losses, "final_no_bn": losses["no_bn"][-1],
              "final_bn": losses["bn"][-1], "epochs": epochs, "activation": args.activation}
    print(f"final test loss: without BN {result['final_no_bn']:.3f}, "
          f"with BN {result['final_bn']:.3f}")
    return result


if __name__ == "__main__":
    main()
