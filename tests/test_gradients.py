"""batch_norm_backward against central finite differences of the forward, in float64.

Loss L = sum(y * g) with a fixed random g, so dL/dy = g is the grad_output handed to the
backward. Each partial derivative of L (with respect to every input element, every weight
and every bias) is estimated as (L(p + h) - L(p - h)) / 2h.

Error of the estimate: truncation h^2 / 6 * |L'''| plus rounding ~ eps * |L| / h. With
h = eps^(1/3) ~ 6e-6 (the optimum for central differences) both are ~ eps^(2/3) ~ 4e-11
times the size of L and its derivatives, which are O(10) here; the bound used, 1e-7
relative to the largest gradient, leaves three orders of magnitude for that and still
catches any formula slip (a missing mean term, n vs n - 1, a wrong eps), which shows up at
the 1e-2 level with these few values per channel.

The forward differentiated is cbn's own and, separately, the NumPy reference, so the
check ties cbn's backward both to its forward and to the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn
from cbn import _reference as ref

from conftest import channels_last, make_input, make_params

H = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)
RTOL = 1e-7
EPS = 1e-3          # large enough that leaving eps out of invstd would be caught

GRAD_CASES = [
    ((5, 3), 1),
    ((6, 4), -1),
    ((3, 4, 5), 1),
    ((3, 5, 4), -1),
    ((2, 3, 2, 3), 1),
    ((2, 3, 3, 2), -1),
    ((2, 2, 3, 2, 2), 1),
    ((2, 2, 2, 2, 3), -1),
    ((4, 3, 2, 2), 2),
]
GRAD_IDS = ["x".join(map(str, s)) + f"-ax{a}" for s, a in GRAD_CASES]


def _loss_fn(impl, g, rm, rv, training, axis):
    """L(x, w, b) = sum(forward(x, w, b) * g); in eval the running stats are constants,
    in training none are passed (nothing is updated between evaluations)."""
    def loss(x, w, b):
        y = impl.batch_norm_forward(x, w, b, None if training else rm,
                                    None if training else rv, training, 0.1, EPS,
                                    axis=axis)[0]
        return float(np.sum(y * g))
    return loss


def _numeric_grad(f, p):
    """Central differences of the scalar f(p) over every element of p (a float64 array)."""
    grad = np.empty(p.shape)
    flat = p.reshape(-1)        # p is contiguous: a view
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        fp = f()
        flat[i] = old - H
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2.0 * H)
    return grad


def _assert_grad(analytic, numeric, what):
    scale = max(1.0, float(np.max(np.abs(numeric))))
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=RTOL * scale,
                               err_msg=what)


@pytest.mark.parametrize("impl", [cbn, ref], ids=["fd_of_cbn", "fd_of_reference"])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_gradients_match_finite_differences(case, training, with_weight, impl):
    shape, axis = case
    C = shape[axis]
    x = make_input(shape, axis, np.float64, seed=11)
    g = np.random.default_rng(12).standard_normal(shape)
    w, b, rm, rv = make_params(C, np.float64, seed=13)
    # weight None means a weight of ones: differentiate at w = 1 in that case
    w_fd = w.copy() if with_weight else np.ones(C)
    loss = _loss_fn(impl, g, rm, rv, training, axis)

    # analytic gradients from cbn, with the saved stats its forward returned
    _, sm, si = cbn.batch_norm_forward(x, w if with_weight else None, b,
                                       None if training else rm, None if training else rv,
                                       training, 0.1, EPS, axis=axis)
    gx, gw, gb = cbn.batch_norm_backward(g, x, w if with_weight else None, sm, si, training,
                                         axis=axis)

    xp, wp, bp = x.copy(), w_fd.copy(), b.copy()
    f = lambda: loss(xp, wp, bp)  # noqa: E731
    _assert_grad(gx, _numeric_grad(f, xp), "grad_input")
    _assert_grad(gw, _numeric_grad(f, wp), "grad_weight")
    _assert_grad(gb, _numeric_grad(f, bp), "grad_bias")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_channels_last_layout(training):
    # the same check on a channels_last (NCHW view of NHWC memory) input
    shape, axis = (2, 3, 3, 2), 1
    x = channels_last(make_input(shape, axis, np.float64, seed=21))
    g = channels_last(np.random.default_rng(22).standard_normal(shape))
    w, b, rm, rv = make_params(3, np.float64, seed=23)
    _, sm, si = cbn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training, 0.1, EPS)
    gx, gw, gb = cbn.batch_norm_backward(g, x, w, sm, si, training)
    loss = _loss_fn(cbn, g, rm, rv, training, axis)
    xp, wp, bp = np.ascontiguousarray(x), w.copy(), b.copy()
    f = lambda: loss(channels_last(xp), wp, bp)  # noqa: E731
    _assert_grad(gx, _numeric_grad(f, xp), "grad_input")
    _assert_grad(gw, _numeric_grad(f, wp), "grad_weight")
    _assert_grad(gb, _numeric_grad(f, bp), "grad_bias")
