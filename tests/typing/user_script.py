"""A small user program over cbn's public API, type-checked with ``mypy --strict``.

tests/typing/test_mypy.py runs mypy on it (when mypy is installed) and also runs it, so
every annotation it relies on is both checked and true. Written as a user would: explicit
types where a user would want them, nothing cast, no ``type: ignore``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

import cbn
from cbn.functional import eval_parameters, normalize
from cbn.modules import IncompatibleKeys

F32 = npt.NDArray[np.float32]


def functional(x: F32) -> Tuple[F32, npt.NDArray[np.float64]]:
    """The functional API: forward, backward, the plain batch_norm, channels-last."""
    C = x.shape[1]
    running_mean: F32 = np.zeros(C, np.float32)
    running_var: F32 = np.ones(C, np.float32)
    weight: List[float] = [1.0] * C                  # any array-like
    y: np.ndarray = cbn.batch_norm(x, running_mean, running_var, weight, None,
                                   training=True, momentum=0.1, eps=1e-5)
    y, save_mean, save_invstd = cbn.batch_norm_forward(
        x, weight, None, running_mean, running_var, True, 0.1, 1e-5, n_threads=1)
    grad_x, grad_weight, grad_bias = cbn.batch_norm_backward(
        np.ones_like(y), x, weight, save_mean, save_invstd, training=True)
    assert grad_x.shape == x.shape and grad_weight.shape == grad_bias.shape == (C,)
    x_nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y_nhwc = cbn.batch_norm(x_nhwc, running_mean, running_var, axis=-1, activation="relu")
    assert float(y_nhwc.min()) >= 0.0
    invstd, scale, shift = eval_parameters(weight, None, running_var, 1e-5, np.float64)
    y64: npt.NDArray[np.float64] = normalize(x.astype(np.float64), running_mean.astype(np.float64),
                                             scale, shift)
    return y, y64


def modules(x: F32) -> Dict[str, np.ndarray]:
    """Modules: training and eval, backward, freeze, state_dict, save/load."""
    C = x.shape[1]
    bn: cbn.BatchNorm2d = cbn.BatchNorm2d(C, momentum=None)
    y = bn(x)
    grad_x: np.ndarray = bn.backward(np.ones_like(y))
    grad_weight: Optional[np.ndarray] = bn.grad_weight
    assert grad_weight is not None and grad_x.shape == x.shape
    bn.zero_grad()
    nbt: Optional[int] = bn.num_batches_tracked
    assert nbt == 1
    frozen: cbn.BatchNorm2d = bn.eval().freeze()     # methods returning self keep the class
    assert frozen.frozen and not frozen.training
    y_eval = frozen(x)
    assert y_eval.dtype == np.float32

    state: Dict[str, np.ndarray] = bn.state_dict()
    other = cbn.BatchNorm(C, dtype=np.float64)
    keys: IncompatibleKeys = other.load_state_dict(state, strict=True)
    missing: List[str] = keys.missing_keys
    assert missing == [] and keys.unexpected_keys == []
    with tempfile.TemporaryDirectory() as d:
        path: str = other.save(os.path.join(d, "bn"))
        loaded: cbn.BatchNorm = cbn.load(path)
    assert loaded.dtype == np.float64 and loaded.num_features == C
    return state


def fold(C: int) -> Tuple[np.ndarray, np.ndarray]:
    """Folding an eval-mode BatchNorm1d into the Linear layer before it."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((C, 5))
    bn = cbn.BatchNorm1d(C, dtype=np.float64).eval()
    W_fused, b_fused = cbn.fold(W, None, bn)
    W2, b2 = bn.fold_into(W, np.zeros(C), transpose=False)
    assert np.allclose(W_fused, W2) and np.allclose(b_fused, b2)
    return W_fused, b_fused


def converters(C: int) -> cbn.BatchNorm2d:
    """A bias-free module with Keras' variance convention, to Keras and back (no Keras
    needed: the weights and config are plain values)."""
    bn = cbn.BatchNorm2d(C, momentum=0.01, axis=-1, bias=False, unbiased=False)
    weights: List[np.ndarray]
    weights, config = bn.to_keras()
    back: cbn.BatchNorm2d = cbn.BatchNorm2d.from_keras(weights, config)  # keeps the class
    assert back.bias is None and not back.unbiased and back.momentum == 0.01
    return back


def threads() -> int:
    """Thread settings."""
    cbn.set_num_threads(1)
    n: int = cbn.get_num_threads()
    cbn.set_num_threads(None)
    enabled: bool = cbn.openmp_enabled()
    version: str = cbn.__version__
    assert n == 1 and isinstance(enabled, bool) and version
    return n


def main() -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    functional(x)
    modules(x)
    fold(3)
    converters(3)
    threads()
    print("user script ok")


if __name__ == "__main__":
    main()
