"""The numbers printed in the seed notebooks (shared/seeds, PyTorch runs), reproduced by cbn.

These are independent oracles: the values were printed by torch.nn.BatchNorm{1,2,3}d in the
notebooks, not computed by cbn's code. Float32 results must match the printed values to
float32 precision; float64 modules to 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest

import cbn

DTYPES = [(np.float32, 1e-6), (np.float64, 1e-12)]


def _feature_maps(batch_size, num_features, feature_shape, dtype):
    """The notebooks' input: feature i is all i + 1, the same for every sample."""
    fm = np.stack([np.ones(feature_shape) * (i + 1) for i in range(num_features)])
    return np.stack([fm] * batch_size).astype(dtype)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_seed_003_batchnorm1d_running_stats(dtype, rtol):
    """003: BatchNorm1d(5, momentum=0.3) on a (3, 5, 1) batch, two iterations."""
    x = _feature_maps(3, 5, (1,), dtype)
    assert x.shape == (3, 5, 1)
    bn = cbn.BatchNorm1d(num_features=5, momentum=0.3, dtype=dtype)
    printed = [([0.3, 0.6, 0.9, 1.2, 1.5], 0.7), ([0.51, 1.02, 1.53, 2.04, 2.55], 0.49)]
    for running_mean, running_var in printed:
        y = bn(x)
        assert y.shape == (3, 5, 1)
        np.testing.assert_allclose(bn.running_mean, running_mean, rtol=rtol)
        np.testing.assert_allclose(bn.running_var, np.full(5, running_var), rtol=rtol)
    # the notebook's hand computation for the 2nd feature (mean_t 2, var_t 0)
    np.testing.assert_allclose(bn.running_mean[1], 1.02, rtol=rtol)
    np.testing.assert_allclose(bn.running_var[1], 0.48999999999999994, rtol=rtol)
    assert bn.num_batches_tracked == 2


@pytest.mark.parametrize("cls, batch, C, fshape", [
    (cbn.BatchNorm2d, 3, 6, (2, 2)),       # 003, nn.BatchNorm2d cell
    (cbn.BatchNorm3d, 3, 4, (2, 2, 3)),    # 003, nn.BatchNorm3d cell
])
def test_seed_003_batchnorm2d_3d_shapes_and_buffers(cls, batch, C, fshape):
    x = _feature_maps(batch, C, fshape, np.float32)
    assert x.shape == (batch, C) + fshape
    bn = cls(num_features=C, momentum=0.3)
    for _ in range(2):
        y = bn(x)
        assert y.shape == x.shape
        for name in ("running_mean", "running_var", "weight", "bias"):
            assert getattr(bn, name).shape == (C,)
    # the same momentum arithmetic as the BatchNorm1d cell: constant channels i + 1
    np.testing.assert_allclose(bn.running_mean, 0.51 * np.arange(1, C + 1), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, np.full(C, 0.49), rtol=1e-6)
    np.testing.assert_array_equal(y, 0)     # constant channels normalize to bias = 0


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_seed_004_eps0_momentum03_four_steps_then_eval_then_train(dtype, rtol):
    """004: BatchNorm1d(4, eps=0, momentum=0.3) on ones((2, 4, 1))."""
    bn = cbn.BatchNorm1d(4, eps=0, momentum=0.3, track_running_stats=True, dtype=dtype)
    entry = np.ones((2, 4, 1), dtype)
    printed = [(0.3, 0.7), (0.51, 0.49), (0.657, 0.343), (0.7599, 0.2401)]
    for running_mean, running_var in printed:
        out = bn(entry)
        # var 0 and eps 0: invstd is 0, so the output is exactly the bias (0)
        np.testing.assert_array_equal(out, np.zeros((2, 4, 1)))
        np.testing.assert_allclose(bn.running_mean, np.full(4, running_mean), rtol=rtol)
        np.testing.assert_allclose(bn.running_var, np.full(4, running_var), rtol=rtol)

    bn.eval()
    for _ in range(2):                         # In [13] and In [14]: the same output twice
        t_out = bn(np.ones((2, 4, 1), dtype))
        np.testing.assert_allclose(t_out, np.full((2, 4, 1), 0.49), rtol=10 * rtol)
    np.testing.assert_allclose(bn.running_mean, np.full(4, 0.7599), rtol=rtol)

    bn.train()
    t_out3 = bn(np.ones((2, 4, 1), dtype))
    np.testing.assert_array_equal(t_out3, 0)
    np.testing.assert_array_equal(bn.weight, [1, 1, 1, 1])
    np.testing.assert_array_equal(bn.bias, [0, 0, 0, 0])


@pytest.mark.parametrize("cls, shape", [
    (cbn.BatchNorm2d, (5, 6, 4, 4)),           # 004, In [18]
    (cbn.BatchNorm3d, (3, 7, 3, 4, 4)),        # 004, In [19]
])
def test_seed_004_output_shapes(cls, shape):
    bn = cls(num_features=shape[1])
    assert bn(np.ones(shape, np.float32)).shape == shape
