"""Module features for inference: fused ReLU, freeze(), fold_into(), half-precision inputs.

Oracles: the unfrozen module and the functional API (results must be identical), the
float64 NumPy reference with the ReLU applied by hand, torch where installed.
"""

import copy
import pickle

import numpy as np
import pytest

import cbn


def _trained(cls=cbn.BatchNorm2d, shape=(6, 4, 5, 5), seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    C = shape[kwargs.get("axis", 1)]
    m = cls(C, **kwargs)
    if m.affine:
        m.weight[:] = rng.standard_normal(C)
        m.bias[:] = rng.standard_normal(C)
    for _ in range(3):
        m(rng.standard_normal(shape).astype(m.dtype) * 2 + 1)
    return m


def _x(shape=(6, 4, 5, 5), seed=1, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


@pytest.mark.parametrize("training", [True, False])
def test_relu_module_matches_reference_and_masks_gradient(training):
    m = _trained(activation="relu").train(training)
    plain = _trained()                       # same parameters and statistics, no ReLU
    plain.train(training)
    x, g = _x(), _x(seed=2)
    y = m(x)
    y_plain = plain(x)
    np.testing.assert_array_equal(y, np.maximum(y_plain, 0))
    dx = m.backward(g)
    dx_plain = plain.backward(np.where(y_plain > 0, g, 0).astype(np.float32))
    np.testing.assert_allclose(dx, dx_plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.grad_weight, plain.grad_weight, rtol=1e-5, atol=1e-5)
    assert "activation='relu'" in repr(m)


def test_relu_module_matches_torch():
    torch = pytest.importorskip("torch")
    m = cbn.BatchNorm2d(4, activation="relu", dtype=np.float64)
    tm = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    x, g = _x(dtype=np.float64), _x(seed=3, dtype=np.float64)
    for training in (True, True, False):
        m.train(training)
        tm.train(training)
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.relu(tm(xt))
        yt.backward(torch.tensor(g))
        y = m(x)
        dx = m.backward(g)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(m.running_var, tm.running_var.numpy(), rtol=1e-12)
        tm.zero_grad()
        m.zero_grad()


@pytest.mark.parametrize("axis,shape", [(1, (6, 4, 5, 5)), (-1, (6, 5, 5, 4))])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_frozen_eval_is_identical_to_eval(axis, shape, activation):
    m = _trained(cbn.BatchNorm, shape=shape, axis=axis, activation=activation).eval()
    x, g = _x(shape), _x(shape, seed=4)
    y = m(x)
    dx = m.backward(g)
    m.zero_grad()
    assert m.freeze() is m and m.frozen and not m.training
    np.testing.assert_array_equal(m(x), y)
    np.testing.assert_array_equal(m.backward(g), dx)


def test_freeze_snapshot_and_refresh():
    m = _trained().freeze()
    x = _x()
    y = m(x)
    m.weight *= 2                             # not seen until freeze() again
    np.testing.assert_array_equal(m(x), y)
    m.freeze()
    assert not np.array_equal(m(x), y)
    np.testing.assert_array_equal(m(x), m.unfreeze()(x))
    # load_state_dict refreezes; train() unfreezes
    m.freeze()
    state = _trained(seed=9).state_dict()
    m.load_state_dict(state)
    assert m.frozen
    np.testing.assert_array_equal(m(x), _trained(seed=9).eval()(x))
    assert not m.train().frozen


def test_freeze_needs_running_stats_and_survives_pickle():
    with pytest.raises(ValueError, match="running statistics"):
        cbn.BatchNorm2d(3, track_running_stats=False).freeze()
    m = _trained().freeze()
    x = _x()
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone.frozen
        np.testing.assert_array_equal(clone(x), m(x))


def test_fold_into_matches_module():
    rng = np.random.default_rng(5)
    m = _trained(cbn.BatchNorm1d, shape=(16, 6), dtype=np.float64).eval()
    W, b = rng.standard_normal((6, 8)), rng.standard_normal(6)
    x = rng.standard_normal((5, 8))
    Wf, bf = m.fold_into(W, b)
    np.testing.assert_allclose(x @ Wf.T + bf, m(x @ W.T + b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_float16_input_on_float32_module(training):
    m = _trained().train(training)
    x16 = _x().astype(np.float16)
    m2 = copy.deepcopy(m)
    y16 = m(x16)
    y32 = m2(x16.astype(np.float32))
    assert y16.dtype == np.float16
    np.testing.assert_array_equal(y16, y32.astype(np.float16))
    np.testing.assert_array_equal(m.running_mean, m2.running_mean)
    dx16 = m.backward(np.ones_like(x16))
    assert dx16.dtype == np.float16
    # a float64 module does not mix with half inputs
    with pytest.raises(TypeError):
        cbn.BatchNorm2d(4, dtype=np.float64)(x16)


def test_save_load_keeps_activation(tmp_path):
    m = _trained(activation="relu").eval()
    loaded = cbn.load(m.save(tmp_path / "bn"))
    assert loaded.activation == "relu"
    np.testing.assert_array_equal(loaded(_x()), m(_x()))
