"""The state of the batch-norm modules outside one process: state dicts under PyTorch's keys,
files (:meth:`BatchNorm.save <StateMixin.save>` and :func:`cbn.load`), pickles, and converters
from and to Keras (``keras.layers.BatchNormalization``) and ONNX (``BatchNormalization``).

:class:`StateMixin` holds these methods and :class:`cbn.BatchNorm` inherits them. They use
only the module's public attributes (``num_features``, ``eps``, ``momentum``, ``affine``,
``track_running_stats``, ``axis``, ``activation``, ``unbiased``, ``training``, ``dtype``,
``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) and its
constructor; the module classes register themselves with :func:`register` so that
:func:`load` can rebuild them by name.

Momentum conventions. cbn (like PyTorch) calls momentum the weight of the new batch,
``rm = (1 - momentum) * rm + momentum * mean``; Keras and ONNX call momentum the weight of the
old value, ``rm = momentum * rm + (1 - momentum) * mean``. The converters translate with
``1 - momentum``: a module's old-value weight ``1 - momentum`` (as the kernels compute it) is
exactly the Keras/ONNX momentum, both ways, for every momentum in [0.5, 1] (Keras' 0.99 is
cbn's 0.01 and back).
Keras and ONNX also update the running variance with the biased batch variance, so modules made
from them have ``unbiased=False``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from typing import (TYPE_CHECKING, Any, BinaryIO, Dict, Iterable, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple, Type, TypeVar, Union)

import numpy as np
from numpy.typing import DTypeLike

from ._checks import FLOAT_DTYPES, check_index, check_momentum, is_half

if TYPE_CHECKING:                                    # only for annotations (no import cycle)
    from .modules import BatchNorm

__all__ = ["IncompatibleKeys", "StateMixin", "load", "register"]

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: version 1: the original configuration; version 2 adds ``bias`` and ``unbiased`` (written
#: only when they differ from the defaults, so other files stay readable by older cbn)
FORMAT_VERSION = 2
_META_KEYS = ("__cbn_format__", "__class__", "__config__")
#: configuration keys of a saved module and the types their values must have
_CONFIG_TYPES: Dict[str, tuple] = {
    "num_features": (int,), "eps": (int, float), "momentum": (int, float, type(None)),
    "affine": (bool,), "track_running_stats": (bool,), "dtype": (str,), "axis": (int,),
    "activation": (str, type(None)), "training": (bool,), "bias": (bool,),
    "unbiased": (bool,)}
#: largest ``__class__`` and ``__config__`` strings a file may hold (characters)
_MAX_NAME = 256
_MAX_CONFIG = 1 << 16
#: what reading a damaged zip member can raise besides ValueError
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, struct.error,
            NotImplementedError, RuntimeError, UnicodeDecodeError, KeyError)

_CLASSES: Dict[str, type] = {}

M = TypeVar("M", bound="StateMixin")


def register(*classes: type) -> None:
    """Make ``classes`` known to :func:`load` (and to :meth:`StateMixin.save`) by name.

    cbn's module classes are registered. :meth:`~StateMixin.save` writes the name of the
    nearest registered class in the module's MRO, so a subclass that is not registered is
    read back as its registered base class.

    Examples
    --------
    >>> import os, tempfile
    >>> import cbn
    >>> from cbn._state import register
    >>> class MyBN(cbn.BatchNorm2d):
    ...     pass
    >>> with tempfile.TemporaryDirectory() as d:
    ...     print(type(cbn.load(MyBN(3).save(os.path.join(d, "a")))).__name__)
    ...     register(MyBN)
    ...     print(type(cbn.load(MyBN(3).save(os.path.join(d, "b")))).__name__)
    BatchNorm2d
    MyBN
    >>> del cbn._state._CLASSES["MyBN"]              # (undo, for this example)
    """
    for c in classes:
        _CLASSES[c.__name__] = c


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` returns (like PyTorch's ``_IncompatibleKeys``).

    Examples
    --------
    >>> import cbn
    >>> bn = cbn.BatchNorm1d(3)
    >>> state = bn.state_dict()
    >>> del state["bias"]
    >>> state["extra"] = [0]
    >>> bn.load_state_dict(state, strict=False)
    IncompatibleKeys(missing_keys=['bias'], unexpected_keys=['extra'])
    """

    missing_keys: List[str]
    unexpected_keys: List[str]


def _to_numpy(value: Any, key: str) -> np.ndarray:
    """A state-dict value as an ndarray: NumPy arrays, torch tensors or any array-like.

    Torch tensors of a dtype NumPy lacks (bfloat16, the float8 types) are converted to
    float32 first, which is exact for every floating type of 32 bits or fewer."""
    if isinstance(value, np.ndarray):
        return value
    try:
        if hasattr(value, "detach") and hasattr(value, "numpy"):    # torch.Tensor
            t = value.detach().cpu()
            try:
                return np.asarray(t.numpy())
            except TypeError:
                if t.is_floating_point() and t.element_size() <= 4:
                    return np.asarray(t.float().numpy())
                raise
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 -- report any conversion failure with the key
        raise TypeError(f"state_dict[{key!r}]: cannot convert {type(value).__name__} to a "
                        f"NumPy array ({e})") from e


def _torch_counter_default(state_dict: Mapping[str, Any]) -> bool:
    """Whether PyTorch would fill in a missing ``num_batches_tracked``: when the state dict
    carries no version metadata, or a version below 2 (saved before the counter existed)."""
    meta = getattr(state_dict, "_metadata", None)
    version = None
    if isinstance(meta, Mapping):
        local = meta.get("")
        if isinstance(local, Mapping):
            version = local.get("version")
    return version is None or (isinstance(version, int) and version < 2)


def _nice(value: float) -> float:
    """A float32 attribute (ONNX stores floats in 32 bits) as the shortest decimal that
    rounds to it, so that 1e-5 stored as 9.99999975e-06 reads back as 1e-05."""
    return float(str(np.float32(value)))


def _new_weight(old_weight: float) -> float:
    """cbn's momentum for Keras'/ONNX's: ``1 - old_weight``, written as the shortest decimal
    ``m`` for which the kernels' old-value weight ``1.0 - m`` is exactly ``old_weight`` (so
    Keras' 0.9 gives 0.1, not 0.09999999999999998); plain ``1 - old_weight`` when none is."""
    m = 1.0 - old_weight
    for digits in range(1, 18):
        short = float(f"{m:.{digits}g}")
        if 1.0 - short == old_weight:
            return short
    return m


def _import_onnx():
    try:
        import onnx
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as e:
        raise ImportError("the ONNX converters need the onnx package (pip install onnx)"
                          ) from e
    return onnx


class StateMixin:
    """State dicts, files, pickles and the Keras/ONNX converters of :class:`cbn.BatchNorm`.

    Examples
    --------
    >>> import pickle
    >>> import numpy as np
    >>> import cbn
    >>> from cbn._state import StateMixin
    >>> issubclass(cbn.BatchNorm, StateMixin)
    True
    >>> sorted(k for k in vars(StateMixin) if not k.startswith("_"))
    ['from_keras', 'from_onnx', 'load_state_dict', 'save', 'state_dict', 'to_keras', 'to_onnx']

    Pickles and copies keep the state but not the record of the last forward call:

    >>> bn = cbn.BatchNorm1d(2)
    >>> _ = bn(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32))
    >>> copy = pickle.loads(pickle.dumps(bn))
    >>> print(copy.running_mean, copy.num_batches_tracked)
    [0.2 0.4] 1
    >>> copy.backward(np.ones((2, 2), np.float32))
    Traceback (most recent call last):
        ...
    RuntimeError: BatchNorm1d.backward() needs a forward() first: there is no forward call
        to differentiate
    """

    # Provided by the module class.
    num_features: int
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool
    axis: int
    activation: Optional[str]
    unbiased: bool
    training: bool
    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    running_mean: Optional[np.ndarray]
    running_var: Optional[np.ndarray]
    num_batches_tracked: Optional[int]
    _dtype: np.dtype
    _frozen: Any

    # ------------------------------------------------------------------------ state dict

    def _state_keys(self) -> List[str]:
        return [k for k in STATE_KEYS if getattr(self, k) is not None]

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Parameters and buffers under PyTorch's keys, as NumPy arrays (copies).

        Keys, in PyTorch's order: ``weight``, ``bias`` (when ``affine``; ``bias`` not with
        ``bias=False``), ``running_mean``, ``running_var``, ``num_batches_tracked`` (an int64
        0-d array; when ``track_running_stats``).

        Examples
        --------
        >>> import cbn
        >>> state = cbn.BatchNorm2d(3).state_dict()
        >>> list(state)
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
        >>> state["running_var"], state["num_batches_tracked"]
        (array([1., 1., 1.], dtype=float32), array(0))
        >>> list(cbn.BatchNorm2d(3, bias=False).state_dict())
        ['weight', 'running_mean', 'running_var', 'num_batches_tracked']
        """
        d: Dict[str, np.ndarray] = {}
        for k in self._state_keys():
            v = getattr(self, k)
            d[k] = np.array(v, dtype=np.int64) if k == "num_batches_tracked" else np.array(v)
        return d

    def _convert(self, key: str, value: Any) -> Union[np.ndarray, int]:
        """A state-dict value checked and converted for this module (raises, changes nothing)."""
        a = _to_numpy(value, key)
        if key == "num_batches_tracked":
            if a.shape != () and a.shape != (1,):
                raise ValueError(f"size mismatch for num_batches_tracked: expected a scalar, "
                                 f"got shape {a.shape}")
            if a.dtype.kind not in "iu":
                raise TypeError(f"num_batches_tracked must be an integer, got dtype {a.dtype}")
            n = int(a.reshape(()))
            if not 0 <= n <= np.iinfo(np.int64).max:
                raise ValueError(f"num_batches_tracked must be a non-negative int64, got {n}")
            return n
        C = self.num_features
        if a.shape != (C,):
            raise ValueError(f"size mismatch for {key}: copying an array of shape {a.shape}, "
                             f"the shape in this module is {(C,)}")
        if a.dtype.kind not in "fiu" and not is_half(a.dtype):
            raise TypeError(f"{key} must hold real numbers (float or int), got dtype {a.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            out = a.astype(self._dtype)          # always a new array
        if a.dtype.kind == "f" and a.dtype.itemsize > out.dtype.itemsize:
            overflow = np.isinf(out) & np.isfinite(a)
            if overflow.any():
                raise ValueError(f"{key} has values too large for {self._dtype.name}: "
                                 f"{a[overflow][:3].tolist()}")
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True
                        ) -> IncompatibleKeys:
        """Copy parameters and buffers from ``state_dict`` into this module.

        Values may be NumPy arrays (float16 and ml_dtypes' bfloat16 included), torch tensors
        (bfloat16 included) or any array-like; they are converted to this module's dtype
        (integers and floats only; float64 values that overflow float32 are refused). With
        ``strict``, the keys must be exactly those of :meth:`state_dict`, except that, as in
        PyTorch, a missing ``num_batches_tracked`` is accepted from state dicts saved before
        that buffer existed (no version metadata, or a version below 2): the counter then
        keeps its current value (0 for a new module). Arrays are copied into the existing
        ``weight``/``bias``/running statistics, so references to them stay valid. Nothing is
        changed when an error is raised.

        Raises ValueError for missing/unexpected keys (all listed) and shape mismatches,
        TypeError for values of the wrong kind. Returns ``(missing_keys, unexpected_keys)``.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> src = cbn.BatchNorm1d(2, momentum=0.5)
        >>> _ = src(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32))
        >>> dst = cbn.BatchNorm1d(2, dtype=np.float64)
        >>> dst.load_state_dict(src.state_dict())
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> print(dst.running_mean, dst.running_mean.dtype, dst.num_batches_tracked)
        [1. 2.] float64 1

        Any array-like is accepted, e.g. a PyTorch module's ``state_dict()`` (tensors) or
        lists. A state dict without ``num_batches_tracked`` and without version metadata (as
        written before PyTorch 0.4.1) loads even with ``strict``, and is not reported
        missing; the counter keeps its value:

        >>> dst.load_state_dict({"weight": [1, 2], "bias": [0, 0], "running_mean": [0, 0],
        ...                      "running_var": [1, 1]})
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> print(dst.weight, dst.running_mean, dst.num_batches_tracked)
        [1. 2.] [0. 0.] 1

        Other keys are missing or unexpected as in PyTorch, an error with ``strict``:

        >>> dst.load_state_dict({"weight": [1, 2], "bais": [0, 0]})
        Traceback (most recent call last):
            ...
        ValueError: Error(s) in loading state_dict for BatchNorm1d: missing key(s): 'bias',
            'running_mean', 'running_var'; unexpected key(s): 'bais'
        >>> dst.load_state_dict({"weight": [1, 2], "bais": [0, 0]}, strict=False)
        IncompatibleKeys(missing_keys=['bias', 'running_mean', 'running_var'],
                         unexpected_keys=['bais'])
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = self._state_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if "num_batches_tracked" in missing and _torch_counter_default(state_dict):
            missing.remove("num_batches_tracked")
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append("missing key(s): " + ", ".join(map(repr, missing)))
            if unexpected:
                parts.append("unexpected key(s): " + ", ".join(map(repr, unexpected)))
            raise ValueError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                             + "; ".join(parts))
        new = {k: self._convert(k, state_dict[k]) for k in expected if k in state_dict}
        # Everything is checked: now write (nothing below can fail).
        for k, v in new.items():
            if k == "num_batches_tracked":
                self.num_batches_tracked = v
                continue
            cur = getattr(self, k)
            if (isinstance(cur, np.ndarray) and cur.shape == v.shape and cur.dtype == v.dtype
                    and cur.flags.writeable):
                cur[...] = v
            else:
                setattr(self, k, v)
        if self._frozen is not None:
            self.freeze()  # type: ignore[attr-defined]
        return IncompatibleKeys(missing, unexpected)

    # --------------------------------------------------------------------- save and load

    def _config(self) -> Dict[str, Any]:
        config = {"num_features": self.num_features, "eps": self.eps,
                  "momentum": self.momentum, "affine": self.affine,
                  "track_running_stats": self.track_running_stats, "dtype": self._dtype.name,
                  "axis": self.axis, "activation": self.activation, "training": self.training}
        if self.affine and self.bias is None:
            config["bias"] = False
        if not self.unbiased:
            config["unbiased"] = False
        return config

    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Write this module to a ``.npz`` file (``.npz`` is appended when missing): the class
        name, hyper-parameters, training flag and :meth:`state_dict`. Read it back with
        :func:`cbn.load`. Returns the path written. No pickles are involved.

        Examples
        --------
        >>> import os, tempfile
        >>> import cbn
        >>> bn = cbn.BatchNorm3d(5, momentum=None).eval()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = bn.save(os.path.join(d, "bn"))
        ...     print(os.path.basename(path), cbn.load(path))
        bn.npz BatchNorm3d(5, eps=1e-05, momentum=None, affine=True, track_running_stats=True)
        """
        name = next(c.__name__ for c in type(self).__mro__ if _CLASSES.get(c.__name__) is c)
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        config = self._config()
        version = 2 if {"bias", "unbiased"} & set(config) else 1
        for k in self._state_keys():
            v = getattr(self, k)
            if k == "num_batches_tracked":
                continue
            if not isinstance(v, np.ndarray) or v.dtype != self._dtype or \
                    v.shape != (self.num_features,):
                what = (f"dtype {v.dtype}, shape {v.shape}" if isinstance(v, np.ndarray)
                        else f"type {type(v).__name__}")
                raise ValueError(f"cannot save: {k} has {what}; the module's arrays must be "
                                 f"{self._dtype.name} of shape {(self.num_features,)} (load "
                                 f"would refuse this file): assign "
                                 f"{k}.astype(numpy.{self._dtype.name}), or use "
                                 "load_state_dict, which converts")
        arrays = {"__cbn_format__": np.array(version),
                  "__class__": np.array(name),
                  "__config__": np.array(json.dumps(config))}
        arrays.update(self.state_dict())
        np.savez(path, **arrays)
        return path

    # ------------------------------------------------------------------- pickle and copy

    def __getstate__(self) -> Dict[str, Any]:
        # The backward record (a reference to the last input) is not part of the module's
        # state, like PyTorch's autograd graph: pickles and deep copies leave it out.
        state = self.__dict__.copy()
        state["_saved"] = None
        # Inside a precise_statistics block, ``forward`` is an instance attribute that feeds
        # that block's accumulator: a copy or a pickle is a module of its own, outside it.
        if getattr(state.get("forward"), "_cbn_precise", False):
            del state["forward"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Pickles from before the running-variance option hold no ``unbiased``.
        self.__dict__.setdefault("unbiased", True)
        self.__dict__.update(state)

    # ----------------------------------------------------------------------------- Keras

    @classmethod
    def from_keras(cls: Type[M], layer_or_weights: Any,
                   config: Optional[Mapping[str, Any]] = None, *,
                   dtype: Optional[DTypeLike] = None) -> M:
        """A module equal to a ``keras.layers.BatchNormalization``.

        ``BatchNorm.from_keras(layer)`` reads a built layer (``get_config()`` and
        ``get_weights()``); ``BatchNorm.from_keras(weights, config)`` takes what those
        return: the weights list ``[gamma (when scale), beta (when center), moving_mean,
        moving_variance]`` and the config dict (``axis``, ``momentum``, ``epsilon``,
        ``center``, ``scale``; Keras' defaults -1, 0.99, 1e-3, True, True when absent).

        The module has ``axis`` = Keras' axis, ``eps`` = epsilon, ``momentum = 1 - keras
        momentum`` (Keras weighs the old value), ``unbiased=False`` (Keras' moving variance
        takes the biased batch variance), ``affine`` unless both ``center`` and ``scale``
        are off, ``bias=False`` for ``center=False`` (a weight of ones stands for
        ``scale=False``), ``num_batches_tracked`` 0, training mode (like any new module).
        ``dtype`` defaults to float64 for float64 weights and float32 otherwise.
        Batch renormalization (``renorm=True``) has no equivalent and raises ValueError.

        Examples
        --------
        From the weights and config (no Keras needed):

        >>> import numpy as np
        >>> import cbn
        >>> weights = [np.array([1.0, 2.0]), np.array([0.0, 0.5]),     # gamma, beta
        ...            np.array([0.1, -0.1]), np.array([1.0, 4.0])]    # moving mean, variance
        >>> bn = cbn.BatchNorm.from_keras(weights, {"axis": -1, "momentum": 0.99,
        ...                                         "epsilon": 1e-3})
        >>> bn
        BatchNorm(2, eps=0.001, momentum=0.01, affine=True, track_running_stats=True,
                  dtype=float64, axis=-1, unbiased=False)
        >>> x = np.array([[1.0, 2.0], [0.0, -1.0]])
        >>> expected = (x - weights[2]) / np.sqrt(weights[3] + 1e-3) * weights[0] + weights[1]
        >>> np.allclose(bn.eval()(x), expected)
        True

        From a built layer (Keras 3):

        >>> import keras                                               # doctest: +SKIP
        >>> layer = keras.layers.BatchNormalization(momentum=0.9)      # doctest: +SKIP
        >>> layer.build((None, 8, 8, 3))                               # doctest: +SKIP
        >>> cbn.BatchNorm2d.from_keras(layer)                          # doctest: +SKIP
        BatchNorm2d(3, eps=0.001, momentum=0.1, affine=True, track_running_stats=True,
                    axis=-1, unbiased=False)
        """
        if config is None:
            layer = layer_or_weights
            if not (hasattr(layer, "get_config") and hasattr(layer, "get_weights")):
                raise TypeError("from_keras(layer) needs a Keras layer (get_config and "
                                "get_weights), or call from_keras(weights, config); got "
                                f"{type(layer).__name__}")
            config = layer.get_config()
            weights = list(layer.get_weights())
            if not weights:
                raise ValueError("the Keras layer has no weights yet: build it (or call it "
                                 "once) before converting")
        else:
            if isinstance(layer_or_weights, (str, bytes)) or not isinstance(
                    layer_or_weights, Iterable):
                raise TypeError("weights must be a list of arrays, got "
                                f"{type(layer_or_weights).__name__}")
            weights = list(layer_or_weights)
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if config.get("renorm"):
            raise ValueError("Keras batch renormalization (renorm=True) has no cbn equivalent")
        axis = config.get("axis", -1)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise ValueError(f"cbn normalizes over one channel axis, the Keras config has "
                                 f"axis={list(axis)}")
            axis = axis[0]
        keras_momentum = check_momentum(config.get("momentum", 0.99))
        eps = config.get("epsilon", 1e-3)
        center = bool(config.get("center", True))
        scale = bool(config.get("scale", True))
        names = ["gamma"] * scale + ["beta"] * center + ["moving_mean", "moving_variance"]
        if len(weights) != len(names):
            raise ValueError(f"expected {len(names)} Keras weights ({', '.join(names)}) for "
                             f"center={center}, scale={scale}; got {len(weights)}")
        arrays = {n: _to_numpy(w, n) for n, w in zip(names, weights)}
        C = arrays["moving_mean"].size
        for n, a in arrays.items():
            if a.shape != (C,):
                raise ValueError(f"Keras weight {n} has shape {a.shape}, expected {(C,)} "
                                 "(one value per channel)")
        if dtype is None:
            dtype = np.float64 if arrays["moving_mean"].dtype == np.float64 else np.float32
        module = cls(C, eps=eps, momentum=_new_weight(keras_momentum), affine=scale or center,
                     dtype=dtype, axis=axis, bias=center or not scale, unbiased=False)
        state: Dict[str, Any] = {"running_mean": arrays["moving_mean"],
                                 "running_var": arrays["moving_variance"],
                                 "num_batches_tracked": np.array(0)}
        if scale:
            state["weight"] = arrays["gamma"]
        if center:
            state["bias"] = arrays["beta"]
        module.load_state_dict(state, strict=False)
        return module

    def to_keras(self) -> Tuple[List[np.ndarray], Dict[str, Any]]:
        """This module as ``(weights, config)`` for ``keras.layers.BatchNormalization``:
        ``layer = BatchNormalization(**config); layer.build(shape); layer.set_weights(weights)``.

        config holds ``axis``, ``momentum`` (``1 - self.momentum``), ``epsilon``, ``center``
        (a bias), ``scale`` (a weight); weights are copies of ``[weight, bias,
        running_mean, running_var]`` (weight and bias when present). Keras always has moving
        statistics and a momentum, and no activation in the layer: a module without
        running statistics, with ``momentum=None`` or with an activation raises ValueError.
        Inference is the same; in training Keras updates the moving variance with the
        biased batch variance, as a module with ``unbiased=False`` does.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm2d(3, momentum=0.01, axis=-1, unbiased=False)
        >>> weights, config = bn.to_keras()
        >>> config
        {'axis': -1, 'momentum': 0.99, 'epsilon': 1e-05, 'center': True, 'scale': True}
        >>> [w.tolist() for w in weights]                  # weight, bias, mean, variance
        [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
        >>> cbn.BatchNorm2d(3, momentum=None).to_keras()
        Traceback (most recent call last):
            ...
        ValueError: Keras has no cumulative moving average (momentum=None); set the module's
            momentum first

        The Keras layer (Keras 3):

        >>> import keras                                               # doctest: +SKIP
        >>> layer = keras.layers.BatchNormalization(**config)          # doctest: +SKIP
        >>> layer.build((None, 8, 8, 3))                               # doctest: +SKIP
        >>> layer.set_weights(weights)                                 # doctest: +SKIP
        >>> x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
        >>> y = keras.ops.convert_to_numpy(layer(x, training=False))   # doctest: +SKIP
        >>> np.allclose(y, bn.eval()(x), atol=1e-6)                    # doctest: +SKIP
        True
        """
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            raise ValueError("Keras' BatchNormalization always has moving statistics; this "
                             "module has none (track_running_stats=False)")
        if self.momentum is None:
            raise ValueError("Keras has no cumulative moving average (momentum=None); set "
                             "the module's momentum first")
        if self.activation is not None:
            raise ValueError(f"Keras' BatchNormalization has no activation; export a module "
                             f"without activation={self.activation!r} and add the activation "
                             "as its own layer")
        config = {"axis": self.axis, "momentum": 1.0 - self.momentum, "epsilon": self.eps,
                  "center": self.bias is not None, "scale": self.weight is not None}
        weights = [np.array(a) for a in (self.weight, self.bias) if a is not None]
        weights += [np.array(self.running_mean), np.array(self.running_var)]
        return weights, config

    # ------------------------------------------------------------------------------ ONNX

    @classmethod
    def from_onnx(cls: Type[M], node: Any,
                  initializers: Union[Mapping[str, Any], Iterable[Any]], *,
                  dtype: Optional[DTypeLike] = None) -> M:
        """A module equal to an ONNX ``BatchNormalization`` node (opset 9 and later).

        ``initializers`` maps the node's input names to arrays (NumPy arrays or
        ``onnx.TensorProto``), or is an iterable of TensorProto such as
        ``model.graph.initializer``; the node's scale, B, input_mean and input_var must be
        there. The module has ``axis=1`` (ONNX's channel axis), ``eps`` = epsilon and
        ``momentum = 1 - onnx momentum`` (ONNX weighs the old value; its defaults are 1e-5 and
        0.9, and its float32 attributes are read as the shortest decimal that gives them),
        ``unbiased=False`` (ONNX updates with the biased batch variance), ``affine=True``,
        and is in training mode when the node's ``training_mode`` is 1. ``dtype`` defaults
        to float64 for float64 parameters and float32 otherwise (float16 and bfloat16
        parameters are converted exactly).

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> params = {"g": np.array([1.0, 2.0], np.float32), "b": np.zeros(2, np.float32),
        ...           "m": np.array([0.5, -0.5], np.float32), "v": np.ones(2, np.float32)}
        >>> import onnx.helper                                         # doctest: +SKIP
        >>> node = onnx.helper.make_node("BatchNormalization", ["X", "g", "b", "m", "v"],
        ...                              ["Y"], epsilon=1e-3, momentum=0.99)  # doctest: +SKIP
        >>> bn = cbn.BatchNorm2d.from_onnx(node, params)               # doctest: +SKIP
        >>> bn                                                         # doctest: +SKIP
        BatchNorm2d(2, eps=0.001, momentum=0.01, affine=True, track_running_stats=True,
                    unbiased=False)
        >>> bn.training, bn.running_mean                               # doctest: +SKIP
        (False, array([ 0.5, -0.5], dtype=float32))

        ``initializers`` may also be a model's ``graph.initializer`` (TensorProto), as
        :meth:`to_onnx` returns them:

        >>> back = cbn.BatchNorm2d.from_onnx(*bn.to_onnx())            # doctest: +SKIP
        >>> back                                                       # doctest: +SKIP
        BatchNorm2d(2, eps=0.001, momentum=0.01, affine=True, track_running_stats=True,
                    unbiased=False)
        """
        onnx = _import_onnx()
        if getattr(node, "op_type", None) != "BatchNormalization" or \
                getattr(node, "domain", "") not in ("", "ai.onnx"):
            raise ValueError("from_onnx needs an ONNX BatchNormalization node, got "
                             f"{getattr(node, 'op_type', type(node).__name__)!r}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        unknown = sorted(set(attrs) - {"epsilon", "momentum", "training_mode", "spatial"})
        if unknown:
            raise ValueError(f"unsupported BatchNormalization attribute(s) {unknown} "
                             "(opsets before 9)")
        if attrs.get("spatial", 1) != 1:
            raise ValueError("BatchNormalization with spatial=0 (per-element statistics) has "
                             "no cbn equivalent")
        inputs = list(node.input)
        if len(inputs) != 5:
            raise ValueError(f"BatchNormalization has 5 inputs (X, scale, B, input_mean, "
                             f"input_var), the node has {len(inputs)}")
        if isinstance(initializers, Mapping):
            found = dict(initializers)
        else:
            try:
                items = list(initializers)
            except TypeError:
                raise TypeError("initializers must be a mapping of names to arrays or an "
                                "iterable of onnx.TensorProto, got "
                                f"{type(initializers).__name__}") from None
            for i, t in enumerate(items):
                if not isinstance(t, onnx.TensorProto):
                    raise TypeError(f"initializers[{i}] is a {type(t).__name__}: a sequence "
                                    "of initializers holds onnx.TensorProto (pass a mapping "
                                    "of names to arrays for NumPy arrays)")
            found = {t.name: t for t in items}
        roles = dict(zip(("scale", "B", "input_mean", "input_var"), inputs[1:]))
        arrays = {}
        for role, name in roles.items():
            if name not in found:
                raise ValueError(f"the node's {role} input {name!r} is not among the "
                                 "initializers")
            v = found[name]
            if isinstance(v, onnx.TensorProto):
                if v.data_location == onnx.TensorProto.EXTERNAL:
                    raise ValueError(f"the node's {role} initializer {name!r} keeps its data "
                                     "in an external file: load the model with its external "
                                     "data (onnx.load(path, load_external_data=True))")
                try:
                    v = onnx.numpy_helper.to_array(v)
                except Exception as e:  # noqa: BLE001 -- onnx's own error types vary
                    raise ValueError(f"the node's {role} initializer {name!r} cannot be "
                                     f"read: {e}") from None
            arrays[role] = _to_numpy(v, name)
        C = arrays["scale"].size
        for role, a in arrays.items():
            if a.shape != (C,):
                raise ValueError(f"ONNX {role} {roles[role]!r} has shape {a.shape}, "
                                 f"expected {(C,)}")
        mode = attrs.get("training_mode", 0)
        if isinstance(mode, bool) or not isinstance(mode, int) or mode not in (0, 1):
            raise ValueError(f"the node's training_mode must be 0 or 1, got {mode!r}")
        if dtype is None:
            dtype = np.float64 if arrays["scale"].dtype == np.float64 else np.float32
        eps = _nice(attrs.get("epsilon", 1e-5))
        onnx_momentum = _nice(attrs.get("momentum", 0.9))
        module = cls(C, eps=eps, momentum=_new_weight(onnx_momentum), affine=True, dtype=dtype,
                     axis=1, unbiased=False)
        module.load_state_dict({"weight": arrays["scale"], "bias": arrays["B"],
                                "running_mean": arrays["input_mean"],
                                "running_var": arrays["input_var"],
                                "num_batches_tracked": np.array(0)})
        module.train(bool(mode))  # type: ignore[attr-defined]
        return module

    def to_onnx(self, input: str = "X", output: str = "Y", *, prefix: str = "bn",
                training_mode: Optional[bool] = None) -> Tuple[Any, List[Any]]:
        """This module as an ONNX ``BatchNormalization`` node (opset 15) and its initializers.

        Returns ``(node, initializers)``: an ``onnx.NodeProto`` reading ``input`` and
        ``prefix + ".weight"``, ``".bias"``, ``".running_mean"``, ``".running_var"``, and a
        list of ``onnx.TensorProto`` with those names (ones and zeros for a missing weight or
        bias). Attributes: ``epsilon``, ``momentum = 1 - self.momentum`` (left out for
        ``momentum=None``) and ``training_mode`` (default: this module's mode). A
        training-mode node has the outputs ``output``, ``prefix + ".running_mean_out"`` and
        ``".running_var_out"``. A module without running statistics normalizes with batch
        statistics in both modes: it is exported in training mode with zeros and ones as the
        input statistics (the running-statistics outputs are then meaningless).

        ValueError for what ONNX cannot express: a channel axis other than 1, an activation,
        and, in training mode, ``momentum=None`` or ``unbiased=True`` (ONNX updates the
        running variance with the biased batch variance).

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm2d(3).eval()
        >>> node, initializers = bn.to_onnx("X", "Y", prefix="bn1")    # doctest: +SKIP
        >>> node.op_type, list(node.input), list(node.output)          # doctest: +SKIP
        ('BatchNormalization', ['X', 'bn1.weight', 'bn1.bias', 'bn1.running_mean',
         'bn1.running_var'], ['Y'])
        >>> [(a.name, a.f) for a in node.attribute]                    # doctest: +SKIP
        [('epsilon', 9.999999747378752e-06), ('momentum', 0.8999999761581421)]
        >>> [t.name for t in initializers]                             # doctest: +SKIP
        ['bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var']

        Run by ONNX's reference evaluator, the node gives the module's output:

        >>> import onnx, onnx.helper                                   # doctest: +SKIP
        >>> from onnx.reference import ReferenceEvaluator              # doctest: +SKIP
        >>> io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
        ...       for n in ("X", "Y")]                                 # doctest: +SKIP
        >>> graph = onnx.helper.make_graph([node], "g", io[:1], io[1:],
        ...                                initializers)               # doctest: +SKIP
        >>> x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
        >>> run = ReferenceEvaluator(graph, opsets={"": 15}).run       # doctest: +SKIP
        >>> y, = run(None, {"X": x})                                   # doctest: +SKIP
        >>> np.allclose(y, bn(x), atol=1e-6)                           # doctest: +SKIP
        True

        Training-mode export needs Keras' and ONNX's running-variance convention:

        >>> cbn.BatchNorm2d(3).to_onnx(training_mode=True)             # doctest: +SKIP
        Traceback (most recent call last):
            ...
        ValueError: ONNX updates the running variance with the biased batch variance: export
            a module with unbiased=False in training mode, or use training_mode=False
        """
        onnx = _import_onnx()
        if self.axis != 1:
            raise ValueError(f"ONNX BatchNormalization normalizes axis 1; this module has "
                             f"axis={self.axis}")
        if self.activation is not None:
            raise ValueError(f"ONNX BatchNormalization has no activation; export a module "
                             f"without activation={self.activation!r} and add a node for it")
        tracked = self.running_mean is not None and self.running_var is not None
        mode = self.training if training_mode is None else bool(training_mode)
        if not tracked:
            if training_mode is not None and not mode:
                raise ValueError("a module without running statistics normalizes with batch "
                                 "statistics: it exports only with training_mode=True")
            mode = True
        elif mode:
            if self.momentum is None:
                raise ValueError("ONNX has no cumulative moving average (momentum=None); set "
                                 "the module's momentum or export with training_mode=False")
            if self.unbiased:
                raise ValueError("ONNX updates the running variance with the biased batch "
                                 "variance: export a module with unbiased=False in training "
                                 "mode, or use training_mode=False")
        C, dt = self.num_features, self._dtype
        params = {"weight": np.ones(C, dt) if self.weight is None else self.weight,
                  "bias": np.zeros(C, dt) if self.bias is None else self.bias,
                  "running_mean": self.running_mean if tracked else np.zeros(C, dt),
                  "running_var": self.running_var if tracked else np.ones(C, dt)}
        names = [f"{prefix}.{k}" for k in params]
        attrs: Dict[str, Any] = {"epsilon": self.eps}
        if self.momentum is not None:
            attrs["momentum"] = 1.0 - self.momentum
        outputs = [output]
        if mode:                # ONNX's shape inference wants all three outputs then
            attrs["training_mode"] = 1
            outputs += [f"{prefix}.running_mean_out", f"{prefix}.running_var_out"]
        node = onnx.helper.make_node("BatchNormalization", [input] + names, outputs,
                                     name=prefix, **attrs)
        initializers = [onnx.numpy_helper.from_array(np.array(a), n)
                        for n, a in zip(names, params.values())]
        return node, initializers


# ------------------------------------------------------------------------------ cbn.load


def _read_npy(zf: zipfile.ZipFile, key: str, where: str, dtypes: Sequence[np.dtype],
              shape: Optional[Tuple[int, ...]], max_bytes: Optional[int] = None) -> np.ndarray:
    """Array ``key`` of an open .npz, its header checked before its data is read: dtype one
    of ``dtypes`` (either byte order; kind and size for strings), ``shape`` when given,
    data size within ``max_bytes`` and equal to what the zip says the member holds."""
    info = zf.getinfo(key + ".npy")
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            got_shape, fortran, dt = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            got_shape, fortran, dt = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"{key}: unsupported .npy format version {version}")
        if dt.hasobject or not any(
                dt.kind == d.kind and (d.kind == "U" or dt.itemsize == d.itemsize)
                for d in dtypes):
            raise ValueError(f"{key} has dtype {dt}, expected " + " or ".join(
                "a unicode string" if d.kind == "U" else str(d) for d in dtypes))
        if shape is not None and tuple(got_shape) != shape:
            raise ValueError(f"{key} has shape {tuple(got_shape)}, expected {shape} "
                             f"({where})")
        nbytes = math.prod(got_shape) * dt.itemsize
        if max_bytes is not None and nbytes > max_bytes:
            raise ValueError(f"{key} holds {nbytes} bytes, more than the {max_bytes} allowed")
        if nbytes != info.file_size - fp.tell():
            raise ValueError(f"{key}: the header announces {nbytes} bytes of data, the member "
                             f"holds {info.file_size - fp.tell()}")
        data = fp.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"{key} is truncated")
    a = np.frombuffer(data, dtype=dt).reshape(got_shape, order="F" if fortran else "C")
    return a.astype(dt.newbyteorder("="))          # native byte order, a writable copy


def _check_config(config: Any) -> Dict[str, Any]:
    """The saved configuration, with the type of every value checked (values are checked
    by the constructor)."""
    if not isinstance(config, dict):
        raise ValueError(f"__config__ must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_CONFIG_TYPES))
    if unknown:
        raise ValueError(f"__config__ has unknown key(s) {unknown}")
    if "num_features" not in config:
        raise ValueError("__config__ has no num_features")
    for k, v in config.items():
        types = _CONFIG_TYPES[k]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise ValueError(f"__config__[{k!r}] has the wrong type ({type(v).__name__})")
    C = check_index(config["num_features"], "num_features")
    if C < 1:
        raise ValueError(f"num_features must be >= 1, got {C}")
    if config.get("dtype", "float32") not in {d.name for d in FLOAT_DTYPES}:
        raise ValueError(f"__config__['dtype'] must be float32 or float64, got "
                         f"{config['dtype']!r}")
    return config


class _Foreign(ValueError):
    """A readable .npz archive that cbn did not write (reported as is)."""


def _read_module(zf: zipfile.ZipFile, name: str) -> Tuple[type, Dict[str, Any],
                                                           Dict[str, np.ndarray]]:
    """(class, configuration, state dict) of an open archive; ValueError if malformed."""
    members = zf.namelist()
    if len(set(members)) != len(members) or not all(m.endswith(".npy") for m in members):
        raise ValueError("the archive holds entries that are not NumPy arrays")
    keys = [m[:-len(".npy")] for m in members]
    if not set(_META_KEYS) <= set(keys):
        raise _Foreign(f"{name!r} is not a module saved by cbn (BatchNorm.save writes "
                       "__cbn_format__, __class__ and __config__ entries)")
    ints = [np.dtype(np.int64), np.dtype(np.int32)]
    version = int(_read_npy(zf, "__cbn_format__", "a scalar", ints, ()))
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"format version {version}; this cbn reads 1 to {FORMAT_VERSION}")
    cls_name = str(_read_npy(zf, "__class__", "a string", [np.dtype("U")], (), 4 * _MAX_NAME))
    cls = _CLASSES.get(cls_name)
    if cls is None:
        raise ValueError(f"unknown module class {cls_name!r}")
    text = str(_read_npy(zf, "__config__", "a string", [np.dtype("U")], (), 4 * _MAX_CONFIG))
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"__config__ is not valid JSON ({e})") from None
    config = _check_config(config)
    if version < 2 and {"bias", "unbiased"} & set(config):
        raise ValueError("__config__ has keys of format version 2 in a version-1 file")
    C = config["num_features"]
    dtype = np.dtype(config.get("dtype", "float32"))
    expected = []
    if config.get("affine", True):
        expected += ["weight", "bias"] if config.get("bias", True) else ["weight"]
    if config.get("track_running_stats", True):
        expected += ["running_mean", "running_var", "num_batches_tracked"]
    stored = [k for k in keys if k not in _META_KEYS]
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing:
        raise ValueError(f"missing array(s) {missing} for the saved configuration")
    if unexpected:
        raise ValueError(f"unexpected array(s) {unexpected}")
    state = {k: _read_npy(zf, k, "a scalar", ints, ()) if k == "num_batches_tracked" else
             _read_npy(zf, k, f"num_features is {C}", [dtype], (C,)) for k in expected}
    return cls, config, state


def load(path: Union[str, "os.PathLike[str]", BinaryIO]) -> BatchNorm:
    """Read a module written by :meth:`BatchNorm.save <StateMixin.save>` (same class,
    hyper-parameters, training flag, parameters and buffers).

    Any file that is not such a module (not a zip, truncated, damaged, missing or extra
    arrays, arrays of the wrong shape or dtype, a configuration that does not parse or does
    not match the arrays) raises ValueError naming the file. Everything is checked from the
    array headers and the sizes the archive declares before any array is read or any module
    allocated. A missing file raises FileNotFoundError (an OSError), as ``open`` does.
    ``path`` may also be a binary file object open for reading (as for ``numpy.load``).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import cbn
    >>> bn = cbn.BatchNorm2d(3, axis=-1)
    >>> _ = bn(np.random.default_rng(0).standard_normal((4, 5, 5, 3)).astype(np.float32))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     loaded = cbn.load(bn.save(os.path.join(d, "bn.npz")))
    >>> loaded
    BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, axis=-1)
    >>> np.array_equal(loaded.running_var, bn.running_var), loaded.num_batches_tracked
    (True, 1)

    A file object works too, and anything else is refused with ValueError:

    >>> d = tempfile.TemporaryDirectory()
    >>> with open(bn.save(os.path.join(d.name, "bn")), "rb") as f:
    ...     print(cbn.load(f).num_batches_tracked)
    1
    >>> np.savez(os.path.join(d.name, "other.npz"), x=np.zeros(3))
    >>> cbn.load(os.path.join(d.name, "other.npz"))
    Traceback (most recent call last):
        ...
    ValueError: '.../other.npz' is not a module saved by cbn (BatchNorm.save writes
        __cbn_format__, __class__ and __config__ entries)
    >>> d.cleanup()
    """
    if isinstance(path, (str, bytes, os.PathLike)):
        name = os.fsdecode(path)
        source: Any = name
    elif not callable(getattr(path, "read", None)):
        raise TypeError("path must be a file name (str, bytes, os.PathLike) or a binary file "
                        f"object open for reading, got {type(path).__name__}")
    else:
        name, source = str(getattr(path, "name", f"<{type(path).__name__}>")), path

    def bad(why: str) -> ValueError:
        return ValueError(f"{name!r} is not a valid module file saved by cbn: {why}")

    try:
        zf = zipfile.ZipFile(source)
    except (ValueError,) + _CORRUPT as e:
        raise bad(f"not a readable .npz (zip) archive: truncated or another format ({e})"
                  ) from None
    with zf:
        try:
            cls, config, state = _read_module(zf, name)
        except _Foreign as e:
            raise ValueError(str(e)) from None
        except (ValueError,) + _CORRUPT as e:
            raise bad(f"{e}" if isinstance(e, ValueError) else
                      f"damaged archive ({type(e).__name__}: {e})") from None
    training = config.pop("training", True)
    try:
        module = cls(**config)
        module.load_state_dict(state, strict=True)
    except (TypeError, ValueError) as e:
        raise bad(f"invalid configuration ({e})") from None
    return module.train(training)
