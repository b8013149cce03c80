"""Small NumPy building blocks shared by the examples: Linear layers with a hand-written
backward, activations, losses, PyTorch's default initializations and the Adam optimizer.

Batch normalization itself is :class:`cbn.BatchNorm1d` (forward and backward); everything
here is plain NumPy and deliberately minimal.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


class Linear:
    """``y = x @ weight.T + bias`` with ``weight`` of shape (out, in), as in ``torch.nn.Linear``.

    ``backward(grad_y)`` returns ``grad_x`` and sets ``grad_weight``/``grad_bias`` (not
    accumulated: each step is one forward and one backward).
    """

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, *, bias: bool = True,
                 init: str = "default", dtype=np.float32) -> None:
        self.weight = init_weight((n_out, n_in), rng, init).astype(dtype)
        if bias:
            bound = 1.0 / math.sqrt(n_in)            # PyTorch's default bias init
            self.bias: Optional[np.ndarray] = rng.uniform(-bound, bound, n_out).astype(dtype)
        else:
            self.bias = None
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self._x: Optional[np.ndarray] = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        self.grad_weight = grad_y.T @ self._x
        if self.bias is not None:
            self.grad_bias = grad_y.sum(axis=0)
        return grad_y @ self.weight

    def params_and_grads(self) -> List[Tuple[np.ndarray, np.ndarray]]:
        pairs = [(self.weight, self.grad_weight)]
        if self.bias is not None:
            pairs.append((self.bias, self.grad_bias))
        return pairs


def init_weight(shape: Tuple[int, int], rng: np.random.Generator, init: str) -> np.ndarray:
    """A (fan_out, fan_in) weight: ``"default"`` is PyTorch's Linear default
    (kaiming_uniform with a=sqrt(5), i.e. uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))),
    ``"kaiming"`` is ``kaiming_normal_`` (std sqrt(2/fan_in)), ``"normal0.1"`` is N(0, 0.1)."""
    fan_in = shape[1]
    if init == "default":
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)
    if init == "kaiming":
        return rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    if init == "normal0.1":
        return rng.normal(0.0, 0.1, shape)
    raise ValueError(f"unknown init {init!r}: expected 'default', 'kaiming' or 'normal0.1'")


# ----------------------------------------------------------------------------- activations

def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def relu_backward(grad_y: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient through ReLU given its output ``y``."""
    return grad_y * (y > 0)


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def tanh_backward(grad_y: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient through tanh given its output ``y``."""
    return grad_y * (1 - y * y)


ACTIVATIONS: Dict[str, Tuple[Callable, Callable]] = {
    "relu": (relu, relu_backward),
    "tanh": (tanh, tanh_backward),
}


# ---------------------------------------------------------------------------------- losses

def mse_loss(pred: np.ndarray, target: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean squared error (``torch.nn.MSELoss()``) and its gradient with respect to ``pred``."""
    diff = pred - target
    return float(np.mean(diff * diff, dtype=np.float64)), (2.0 / diff.size) * diff


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient with respect to ``logits``."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -float(logp[np.arange(n), labels].mean())
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1
    return loss, (grad / n).astype(logits.dtype)


# ------------------------------------------------------------------------------- optimizer

class Adam:
    """``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8, bias-corrected), updating in place.

    ``step(pairs)`` takes the (parameter, gradient) pairs in the same order every step.
    """

    def __init__(self, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0
        self._m: List[np.ndarray] = []
        self._v: List[np.ndarray] = []

    def step(self, pairs: Sequence[Tuple[np.ndarray, Optional[np.ndarray]]]) -> None:
        if not self._m:
            self._m = [np.zeros_like(p) for p, _ in pairs]
            self._v = [np.zeros_like(p) for p, _ in pairs]
        self.t += 1
        b1, b2 = self.betas
        c1 = 1 - b1 ** self.t
        c2 = 1 - b2 ** self.t
        for (p, g), m, v in zip(pairs, self._m, self._v):
            if g is None:
                continue
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)


def batches(n: int, batch_size: int, rng: np.random.Generator, shuffle: bool = True):
    """Index arrays of consecutive mini-batches (the last may be smaller), like a DataLoader."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]
