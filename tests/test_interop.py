"""Converters against the real libraries: Keras 3 (torch backend) and ONNX's reference
evaluator (``onnx.reference``). Each library is the oracle for its own layer: outputs in
training and inference, moving/running statistics after several steps, and the converters
both ways. Skipped cleanly where keras (or its torch backend) or onnx is not installed."""

from __future__ import annotations

import os

import numpy as np
import pytest

import cbn

# Keras 3's torch backend calls np.array(x) on objects whose __array__ lacks NumPy 2's copy=.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


def _x(rng, shape, axis, dtype=np.float32):
    C = shape[axis]
    s = [1] * len(shape)
    s[axis] = C
    return (rng.standard_normal(shape) * rng.uniform(0.5, 3, C).reshape(s)
            + rng.uniform(-3, 3, C).reshape(s)).astype(dtype)


# ----------------------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"        # before the first import of keras
    pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported earlier with the {keras.backend.backend()} backend")
    return keras


def _keras_layer(keras, rng, C, shape, **config):
    layer = keras.layers.BatchNormalization(**config)
    layer.build(shape)
    weights = []
    if config.get("scale", True):
        weights.append(rng.uniform(0.5, 2, C))
    if config.get("center", True):
        weights.append(rng.uniform(-1, 1, C))
    weights += [rng.uniform(-1, 1, C), rng.uniform(0.5, 2, C)]
    layer.set_weights([w.astype(np.float32) for w in weights])
    return layer


def _np(keras, t):
    return keras.ops.convert_to_numpy(t)


@pytest.mark.parametrize("config, shape, axis", [
    ({}, (4, 5, 6, 3), -1),                                     # Keras' defaults, NHWC
    ({"momentum": 0.9, "epsilon": 1e-5}, (8, 3), -1),
    ({"axis": 1, "momentum": 0.8}, (4, 3, 5, 6), 1),             # channels first
    ({"center": False}, (6, 7, 3), -1),
    ({"scale": False, "momentum": 0.5}, (6, 7, 3), -1),
    ({"center": False, "scale": False, "epsilon": 0.1}, (6, 7, 3), -1),
])
def test_from_keras_trains_and_infers_like_keras(keras, config, shape, axis):
    rng = np.random.default_rng(len(shape) + len(config))
    C = shape[axis]
    layer = _keras_layer(keras, rng, C, (None,) + shape[1:], **config)
    m = cbn.BatchNorm.from_keras(layer)
    assert m.axis == config.get("axis", -1) and m.eps == config.get("epsilon", 1e-3)
    assert m.unbiased is False and m.training
    assert 1.0 - m.momentum == config.get("momentum", 0.99)      # exact both ways
    for step in range(5):
        x = _x(rng, shape, axis)
        np.testing.assert_allclose(m(x), _np(keras, layer(x, training=True)),
                                   err_msg=f"train step {step}", **TOL[np.float32])
        moving_mean, moving_var = layer.get_weights()[-2:]
        np.testing.assert_allclose(m.running_mean, moving_mean, **TOL[np.float32])
        np.testing.assert_allclose(m.running_var, moving_var, **TOL[np.float32])
    m.eval()
    x = _x(rng, shape, axis)
    np.testing.assert_allclose(m(x), _np(keras, layer(x, training=False)), **TOL[np.float32])


def test_keras_momentum_convention_is_the_old_values_weight(keras):
    # one step with momentum 0.99 moves the moving mean by 1% of the way to the batch mean
    layer = keras.layers.BatchNormalization()
    layer.build((None, 2))
    m = cbn.BatchNorm.from_keras(layer)
    assert abs(m.momentum - 0.01) < 1e-15
    x = np.array([[1.0, 3.0], [3.0, 5.0]], np.float32)          # means 2, 4; biased vars 1, 1
    m(x)
    layer(x, training=True)
    np.testing.assert_allclose(m.running_mean, [0.02, 0.04], rtol=1e-6)
    np.testing.assert_allclose(m.running_var, [1.0, 1.0], rtol=1e-6)  # 0.99 + 0.01 * 1
    np.testing.assert_allclose(layer.get_weights()[2:], [m.running_mean, m.running_var],
                               rtol=1e-6)


def test_from_keras_weights_and_config(keras):
    rng = np.random.default_rng(5)
    layer = _keras_layer(keras, rng, 4, (None, 6, 4), momentum=0.95, epsilon=2e-3)
    a = cbn.BatchNorm1d.from_keras(layer)
    b = cbn.BatchNorm1d.from_keras(layer.get_weights(), layer.get_config())
    assert type(a) is type(b) is cbn.BatchNorm1d and repr(a) == repr(b)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])
    weights = layer.get_weights()
    for got, want in zip((a.weight, a.bias, a.running_mean, a.running_var), weights):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"affine": False},
                                    {"momentum": 0.3, "eps": 1e-2, "axis": 1}])
def test_to_keras_round_trip(keras, kwargs):
    rng = np.random.default_rng(6)
    m = cbn.BatchNorm(3, axis=kwargs.pop("axis", -1), unbiased=False, **kwargs)
    shape = (5, 4, 3) if m.axis == -1 else (5, 3, 4)
    for _ in range(3):
        m(_x(rng, shape, m.axis))
    if m.affine:
        m.weight[:] = rng.uniform(0.5, 2, 3)
    weights, config = m.to_keras()
    layer = keras.layers.BatchNormalization(**config)
    layer.build((None,) + shape[1:])
    layer.set_weights(weights)
    m.eval()
    x = _x(rng, shape, m.axis)
    np.testing.assert_allclose(m(x), _np(keras, layer(x, training=False)), **TOL[np.float32])
    back = cbn.BatchNorm.from_keras(layer)
    assert repr(back) == repr(m.train())
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(back, k), getattr(m, k))


def test_keras_conversion_errors(keras):
    with pytest.raises(ValueError, match="renorm"):
        cbn.BatchNorm.from_keras([np.zeros(2)] * 4, {"renorm": True})
    with pytest.raises(ValueError, match="expected 3 Keras weights"):
        cbn.BatchNorm.from_keras([np.zeros(2)] * 4, {"center": False})
    with pytest.raises(ValueError, match="shape"):
        cbn.BatchNorm.from_keras([np.zeros(2)] * 3 + [np.ones(3)], {})
    with pytest.raises(ValueError, match="not.*built|no weights"):
        cbn.BatchNorm.from_keras(keras.layers.BatchNormalization())
    with pytest.raises(ValueError, match="momentum=None"):
        cbn.BatchNorm(2, momentum=None).to_keras()
    with pytest.raises(ValueError, match="moving statistics"):
        cbn.BatchNorm(2, track_running_stats=False).to_keras()
    with pytest.raises(ValueError, match="activation"):
        cbn.BatchNorm(2, activation="relu").to_keras()


# ------------------------------------------------------------------------------ ONNX


@pytest.fixture(scope="module")
def onnx():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnx.reference")
    return onnx


ELEM = {np.float32: 1, np.float64: 11}                           # TensorProto.FLOAT, DOUBLE
# ONNX stores epsilon as a float32 attribute (1e-5 becomes 9.99999975e-06) and its evaluator
# adds that; cbn reads it back as 1e-05: float64 results differ at ~1e-11 relative.
ONNX_TOL = {np.float32: TOL[np.float32], np.float64: dict(rtol=1e-9, atol=1e-9)}


def _model(onnx, node, initializers, x_shape, dtype):
    """A one-node opset-15 model of ``node``, checked by onnx.checker."""
    helper = onnx.helper
    C = x_shape[1]
    outputs = [helper.make_tensor_value_info(o, ELEM[dtype], list(x_shape) if i == 0 else [C])
               for i, o in enumerate(node.output)]
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info(
        node.input[0], ELEM[dtype], list(x_shape))], outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _onnx_node(onnx, rng, C, dtype, training_mode, **attrs):
    names = ["scale", "B", "mean", "var"]
    outputs = ["Y", "mean_out", "var_out"] if training_mode else ["Y"]
    node = onnx.helper.make_node("BatchNormalization", ["X"] + names, outputs,
                                 training_mode=int(training_mode), **attrs)
    values = [rng.uniform(0.5, 2, C), rng.uniform(-1, 1, C), rng.uniform(-1, 1, C),
              rng.uniform(0.5, 2, C)]
    return node, {n: v.astype(dtype) for n, v in zip(names, values)}


def _run(onnx, node, arrays, x):
    from onnx.reference import ReferenceEvaluator
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in arrays.items()]
    model = _model(onnx, node, inits, x.shape, x.dtype.type)
    return ReferenceEvaluator(model).run(None, {node.input[0]: x})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 7), (3, 3, 4, 5)])
def test_from_onnx_inference_like_the_reference(onnx, dtype, shape):
    rng = np.random.default_rng(len(shape))
    node, arrays = _onnx_node(onnx, rng, 3, dtype, False, epsilon=1e-3)
    m = cbn.BatchNorm.from_onnx(node, arrays)
    assert not m.training and m.dtype == dtype and m.eps == 1e-3
    x = _x(rng, shape, 1, dtype)
    (y,) = _run(onnx, node, arrays, x)
    np.testing.assert_allclose(m(x), y, **ONNX_TOL[dtype])


# float64 with momenta that float32 holds exactly: the evaluator uses the float32 attribute
# (0.9 is 0.899999976), cbn the decimal it stands for (0.9), 3e-8 apart.
@pytest.mark.parametrize("dtype, momentum", [(np.float32, 0.9), (np.float32, 0.99),
                                             (np.float32, 0.5), (np.float64, 0.5),
                                             (np.float64, 0.75), (np.float64, 0.9375)])
def test_from_onnx_training_like_the_reference(onnx, dtype, momentum):
    # Several steps: the reference's running-statistics outputs are fed back as its next
    # inputs; cbn's module updates its own. y, running mean and var agree at every step.
    rng = np.random.default_rng(int(momentum * 1000))
    node, arrays = _onnx_node(onnx, rng, 4, dtype, True, momentum=momentum)
    m = cbn.BatchNorm2d.from_onnx(node, arrays)
    assert m.training and m.unbiased is False and m.eps == 1e-5
    assert 1.0 - m.momentum == momentum
    for step in range(4):
        x = _x(rng, (3, 4, 5, 2), 1, dtype)
        y, mean_out, var_out = _run(onnx, node, arrays, x)
        np.testing.assert_allclose(m(x), y, err_msg=f"y, step {step}", **ONNX_TOL[dtype])
        np.testing.assert_allclose(m.running_mean, mean_out, **ONNX_TOL[dtype])
        np.testing.assert_allclose(m.running_var, var_out, **ONNX_TOL[dtype])
        arrays = dict(arrays, mean=mean_out, var=var_out)


def test_from_onnx_reads_graph_initializers(onnx):
    rng = np.random.default_rng(3)
    node, arrays = _onnx_node(onnx, rng, 3, np.float32, False)
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in arrays.items()]
    a = cbn.BatchNorm.from_onnx(node, inits)                 # an iterable of TensorProto
    b = cbn.BatchNorm.from_onnx(node, dict(zip(arrays, inits)))
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    np.testing.assert_array_equal(a.running_var, arrays["var"])


@pytest.mark.parametrize("kwargs, training", [
    ({}, False), ({"unbiased": False}, True), ({"bias": False}, False),
    ({"affine": False, "unbiased": False, "momentum": 0.25}, True),
    ({"dtype": np.float64, "eps": 1e-3}, False),
    ({"track_running_stats": False}, True),
    ({"track_running_stats": False, "momentum": None}, False),
])
def test_to_onnx_like_the_module(onnx, kwargs, training):
    rng = np.random.default_rng(4)
    m = cbn.BatchNorm2d(3, **kwargs)
    dtype = m.dtype.type
    for _ in range(2):
        m(_x(rng, (2, 3, 4, 5), 1, dtype))
    if m.affine:
        m.weight[:] = rng.uniform(0.5, 2, 3)
    if m.bias is not None:
        m.bias[:] = rng.uniform(-1, 1, 3)
    m.train(training)
    node, inits = m.to_onnx("input", "output", prefix="bn1")
    assert node.input[0] == "input" and node.output[0] == "output"
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in inits}
    x = _x(rng, (2, 3, 4, 5), 1, dtype)
    results = _run(onnx, node, arrays, x)
    state = {k: None if v is None else v.copy() for k, v in
             (("rm", m.running_mean), ("rv", m.running_var))}
    np.testing.assert_allclose(m(x), results[0], **ONNX_TOL[dtype])
    if m.training and m.track_running_stats:
        np.testing.assert_allclose(m.running_mean, results[1], **ONNX_TOL[dtype])
        np.testing.assert_allclose(m.running_var, results[2], **ONNX_TOL[dtype])
    back = cbn.BatchNorm2d.from_onnx(node, inits)
    if m.track_running_stats:
        np.testing.assert_array_equal(back.running_mean, state["rm"])
        np.testing.assert_array_equal(back.running_var, state["rv"])
        assert back.eps == m.eps and back.training == m.training
        if m.momentum is not None:
            assert back.momentum == m.momentum
    np.testing.assert_array_equal(back.weight, 1 if m.weight is None else m.weight)


def test_onnx_conversion_errors(onnx):
    with pytest.raises(ValueError, match="axis 1"):
        cbn.BatchNorm(3, axis=-1).to_onnx()
    with pytest.raises(ValueError, match="activation"):
        cbn.BatchNorm(3, activation="relu").to_onnx()
    with pytest.raises(ValueError, match="biased"):
        cbn.BatchNorm(3).to_onnx(training_mode=True)
    with pytest.raises(ValueError, match="momentum=None"):
        cbn.BatchNorm(3, momentum=None, unbiased=False).to_onnx(training_mode=True)
    with pytest.raises(ValueError, match="batch statistics"):
        cbn.BatchNorm(3, track_running_stats=False).to_onnx(training_mode=False)
    node, arrays = _onnx_node(onnx, np.random.default_rng(0), 3, np.float32, False)
    with pytest.raises(ValueError, match="'var' is not among"):
        cbn.BatchNorm.from_onnx(node, {k: v for k, v in arrays.items() if k != "var"})
    with pytest.raises(ValueError, match="shape"):
        cbn.BatchNorm.from_onnx(node, dict(arrays, mean=np.zeros(4, np.float32)))
    relu = onnx.helper.make_node("Relu", ["X"], ["Y"])
    with pytest.raises(ValueError, match="BatchNormalization node"):
        cbn.BatchNorm.from_onnx(relu, arrays)
    spatial = onnx.helper.make_node("BatchNormalization", list(node.input), ["Y"], spatial=0)
    with pytest.raises(ValueError, match="spatial"):
        cbn.BatchNorm.from_onnx(spatial, arrays)


def test_from_keras_float64_layer(keras):
    # A float64 layer gives a float64 module. (Keras' torch backend loses float64 precision
    # somewhere in its float64 layer, ~1e-8 relative: compared at float32 tolerance.)
    rng = np.random.default_rng(8)
    layer = keras.layers.BatchNormalization(dtype="float64", momentum=0.75)
    layer.build((None, 3))
    layer.set_weights([rng.uniform(0.5, 2, 3), rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3),
                       rng.uniform(0.5, 2, 3)])
    m = cbn.BatchNorm1d.from_keras(layer)
    assert m.dtype == np.float64
    np.testing.assert_array_equal(m.running_var, layer.get_weights()[3])
    for _ in range(3):
        x = _x(rng, (7, 3), 1, np.float64)
        xk = keras.ops.convert_to_tensor(x, dtype="float64")
        np.testing.assert_allclose(m(x), _np(keras, layer(xk, training=True)),
                                   **TOL[np.float32])
    np.testing.assert_allclose(m.running_var, layer.get_weights()[3], **TOL[np.float32])


# ------------------------------------------------------------------ docstring examples


def _run_skipped_examples(method):
    """Run a converter's docstring Examples with their ``+SKIP`` lines (those that need the
    library) run too; tests/test_doctests.py runs the others everywhere."""
    import doctest
    test = doctest.DocTestFinder().find(method, method.__qualname__,
                                        globs={})[0]
    skipped = [ex for ex in test.examples if ex.options.get(doctest.SKIP)]
    assert skipped, f"{method.__qualname__} has no example that needs the library"
    for ex in skipped:
        del ex.options[doctest.SKIP]
    out = []
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    with np.printoptions(legacy=False):
        result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)


@pytest.mark.parametrize("name", ["from_keras", "to_keras"])
def test_keras_docstring_examples(keras, name):
    _run_skipped_examples(getattr(cbn.BatchNorm, name))


@pytest.mark.parametrize("name", ["from_onnx", "to_onnx"])
def test_onnx_docstring_examples(onnx, name):
    _run_skipped_examples(getattr(cbn.BatchNorm, name))
