"""Batch-normalization modules with the state and behaviour of ``torch.nn.BatchNorm{1,2,3}d``.

A module holds parameters (``weight``, ``bias``), buffers (``running_mean``, ``running_var``,
``num_batches_tracked``) and the ``training`` flag, and calls :mod:`cbn.functional` for all
arithmetic on data (the biased running-variance convention, ``unbiased=False``, rescales
the kernel's per-channel update: see ``cbn._stages.biased_update``); it never touches the
kernels. State
dicts, files, pickles and the Keras/ONNX converters are in :mod:`cbn._state`. The logic that
picks batch or running statistics and the momentum is PyTorch's own
(``torch.nn.modules.batchnorm._BatchNorm.forward``)::

    factor = 0.0 if momentum is None else momentum
    if training and track_running_stats:
        num_batches_tracked += 1
        factor = 1 / num_batches_tracked if momentum is None else momentum
    bn_training = training or (running_mean is None and running_var is None)
    running stats are passed only if (not training or track_running_stats)

with one difference: ``num_batches_tracked`` is incremented only after the call succeeded,
so a call that raises changes nothing.

Unlike PyTorch there is no autograd: :meth:`BatchNorm.backward` takes the gradient of the
output of the last :meth:`~BatchNorm.forward` and returns the gradient of its input,
accumulating ``grad_weight`` and ``grad_bias`` the way ``.grad`` accumulates.

Threads: in eval mode a module may be called from several Python threads at once; each call
allocates its own output and shares no scratch state (the only write is one atomic attribute
assignment recording what :meth:`~BatchNorm.backward` needs, so after concurrent calls
``backward`` refers to whichever finished last). Training-mode calls update
``running_mean``/``running_var`` in place and ``num_batches_tracked``; ``backward`` updates
``grad_weight``/``grad_bias``: serialize those yourself.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _activations, _state
from ._checks import (FLOAT_DTYPES, HALF_DTYPES, check_eps, check_float_dtype, check_index,
                      check_momentum)
from ._state import IncompatibleKeys, StateMixin, load
from . import _stages
from .functional import batch_norm_backward, batch_norm_forward, eval_parameters, normalize

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "IncompatibleKeys", "load"]

#: the type of ``self`` in methods that return it (``BatchNorm2d(...).eval()`` is a BatchNorm2d)
_BN = TypeVar("_BN", bound="BatchNorm")


#: where num_batches_tracked stops (the int64 of PyTorch's buffer and of state dicts)
_COUNTER_MAX = 2**63 - 1


class BatchNorm(StateMixin):
    """Batch normalization over the channel axis of 2D to 5D inputs, with PyTorch's state.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel, with the batch's
    statistics in training (updating the running ones) and the running ones in eval.

    Parameters
    ----------
    num_features : int
        C, the number of channels (the size of the input along ``axis``).
    eps : float
        Added to the variance (0 allowed).
    momentum : float or None
        Weight of a new batch in the running statistics; None gives the cumulative moving
        average (simple mean over ``num_batches_tracked`` batches).
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); without them both are None.
    track_running_stats : bool
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``;
        without them all three are None and eval mode also uses batch statistics.
    dtype : float32 or float64, keyword-only
        dtype of the parameters and buffers; inputs must have this dtype.
    axis : int, keyword-only
        The channel axis: 1 for ``(N, C, *)``, -1 for channels-last.
    activation : None, "relu", "relu6", "leaky_relu", "silu" or "hardswish", keyword-only
        Applied to the output in the same pass (``act(bn(x))``, torch's definitions);
        :meth:`backward` multiplies the gradient by its derivative in its own passes.
    bias : bool, keyword-only
        With ``affine``, whether there is a ``bias`` (``bias=False``: a weight without a
        bias, as in PyTorch's ``BatchNorm2d(C, bias=False)``).
    negative_slope : float, keyword-only
        leaky_relu's slope below 0 (default 0.01, as torch; its backward needs it >= 0).
        Not part of the state dict.
    unbiased : bool, keyword-only
        The running-variance convention. True (PyTorch's): the running variance is updated
        with the unbiased batch variance, ``rv = (1 - m) * rv + m * var * n / (n - 1)``.
        False (Keras', ONNX's): with the biased one, ``rv = (1 - m) * rv + m * var``. The
        output is the same (it always uses the biased batch variance).

    Modules also convert from and to Keras (:meth:`from_keras`, :meth:`to_keras`) and ONNX
    (:meth:`from_onnx`, :meth:`to_onnx`); note that Keras' and ONNX's momentum is the weight
    of the old value (Keras' 0.99 is cbn's and PyTorch's 0.01).

    A float32 module also takes float16 (and ml_dtypes' bfloat16) inputs: they are
    computed in float32 and the output has the input's dtype, as in PyTorch on the CPU.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
    running_mean, running_var : ndarray of shape (C,) or None
    num_batches_tracked : int or None
        Training batches seen (``state_dict`` gives it as an int64 0-d array).
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Gradients accumulated by :meth:`backward` (None until the first one, and after
        :meth:`zero_grad`); always None for a missing ``weight`` or ``bias``.
    training : bool
    unbiased : bool

    See Also
    --------
    BatchNorm1d, BatchNorm2d, BatchNorm3d : The same for a fixed input ndim, as in PyTorch.
    batch_norm : The functional form.

    Examples
    --------
    >>> import numpy as np
    >>> import cbn
    >>> bn = cbn.BatchNorm(4, momentum=0.5, axis=-1)       # channels-last, any ndim
    >>> bn
    BatchNorm(4, eps=1e-05, momentum=0.5, affine=True, track_running_stats=True, axis=-1)
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (2, 8, 8, 4)).astype(np.float32)
    >>> y = bn(x)                                          # training: batch statistics
    >>> np.allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    True
    >>> np.allclose(bn.running_mean, 0.5 * x.mean(axis=(0, 1, 2)))
    True
    >>> bn.num_batches_tracked
    1
    >>> y = bn.eval()(x)                                   # eval: running statistics
    >>> expected = (x - bn.running_mean) / np.sqrt(bn.running_var + bn.eps)
    >>> np.allclose(y, expected, atol=1e-5)
    True

    A weight without a bias, and Keras' (biased) running-variance update:

    >>> bn = cbn.BatchNorm1d(2, momentum=1.0, dtype=np.float64, bias=False, unbiased=False)
    >>> bn
    BatchNorm1d(2, eps=1e-05, momentum=1.0, affine=True, bias=False,
                track_running_stats=True, dtype=float64, unbiased=False)
    >>> print(bn.bias)
    None
    >>> _ = bn(np.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> print(bn.running_var)                              # the biased batch variance
    [1. 4.]
    """

    #: input ndims this class accepts, and how its error message names them
    _ndims: frozenset = frozenset((2, 3, 4, 5))
    _ndims_text: str = "2D to 5D"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 dtype: DTypeLike = np.float32, axis: int = 1,
                 activation: Optional[str] = None, bias: bool = True,
                 unbiased: bool = True, negative_slope: float = 0.01) -> None:
        num_features = check_index(num_features, "num_features")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        dt = check_float_dtype(dtype)
        axis = check_index(axis, "axis")
        max_ndim = max(self._ndims)
        if not -max_ndim <= axis < max_ndim:
            raise np.exceptions.AxisError(axis, max_ndim)

        _activations.activation_kind(activation)        # ValueError naming the choices
        self.negative_slope: float = _activations.check_negative_slope(negative_slope)
        for name, flag in (("bias", bias), ("unbiased", unbiased)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.activation: Optional[str] = activation
        self.num_features: int = num_features
        self.eps: float = check_eps(eps)
        self.momentum: Optional[float] = check_momentum(momentum, allow_none=True)
        self.affine: bool = bool(affine)
        self.track_running_stats: bool = bool(track_running_stats)
        self.axis: int = axis
        self.unbiased: bool = bool(unbiased)
        self._dtype: np.dtype = dt
        self.training: bool = True

        C = num_features
        self.weight: Optional[np.ndarray] = np.ones(C, dt) if self.affine else None
        self.bias: Optional[np.ndarray] = np.zeros(C, dt) if self.affine and bias else None
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        if self.track_running_stats:
            self.running_mean: Optional[np.ndarray] = np.zeros(C, dt)
            self.running_var: Optional[np.ndarray] = np.ones(C, dt)
            self.num_batches_tracked: Optional[int] = 0
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        # What backward needs from the last forward, replaced in one assignment:
        # (input, save_mean, save_invstd, used batch statistics, axis, output if ReLU).
        self._saved: Optional[Tuple[Any, ...]] = None
        # freeze(): (running_mean, scale, shift, invstd) copies for the one-pass eval
        self._frozen: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = None

    # ------------------------------------------------------------------ basic properties

    @property
    def dtype(self) -> np.dtype:
        """dtype of the parameters and buffers (and of the inputs this module accepts).

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> cbn.BatchNorm2d(3, dtype=np.float64).dtype
        dtype('float64')
        """
        return self._dtype

    def extra_repr(self) -> str:
        """The arguments shown by ``repr`` (those that differ from the defaults for dtype,
        axis, activation, bias and unbiased), as in PyTorch.

        Examples
        --------
        >>> import cbn
        >>> cbn.BatchNorm1d(8, momentum=None, activation="relu").extra_repr()
        "8, eps=1e-05, momentum=None, affine=True, track_running_stats=True, activation='relu'"
        >>> cbn.BatchNorm1d(8, bias=False).extra_repr()
        '8, eps=1e-05, momentum=0.1, affine=True, bias=False, track_running_stats=True'
        """
        # PyTorch 2.13 shows bias= always; cbn only when a weight has no bias.
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
             f"affine={self.affine}, "
             + ("bias=False, " if self.affine and self.bias is None else "")
             + f"track_running_stats={self.track_running_stats}")
        if self._dtype != np.float32:
            s += f", dtype={self._dtype.name}"
        if self.axis != 1:
            s += f", axis={self.axis}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        if not self.unbiased:
            s += ", unbiased=False"
        return s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    # ---------------------------------------------------------------------------- modes

    def train(self: _BN, mode: bool = True) -> _BN:
        """Set training mode (batch statistics, running ones updated); returns self.

        Examples
        --------
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(3)
        >>> bn.train(False).training, bn.train().training
        (False, True)
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError("training mode is expected to be boolean, got "
                             f"{type(mode).__name__}")
        self.training = bool(mode)
        if self.training:
            self._frozen = None
        return self

    def eval(self: _BN) -> _BN:
        """Set eval mode (running statistics, when tracked); returns self.

        Examples
        --------
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(3).eval()
        >>> bn.training
        False
        """
        return self.train(False)

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (when tracked).

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(2)
        >>> _ = bn(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32))
        >>> print(bn.running_mean, bn.num_batches_tracked)
        [0.2 0.4] 1
        >>> bn.reset_running_stats()
        >>> print(bn.running_mean, bn.running_var, bn.num_batches_tracked)
        [0. 0.] [1. 1.] 0
        """
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics, and weight to ones and bias to zeros.

        Examples
        --------
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(2)
        >>> bn.weight[:] = 3.0
        >>> bn.reset_parameters()
        >>> print(bn.weight, bn.bias)
        [1. 1.] [0. 0.]
        """
        self.reset_running_stats()
        if self.weight is not None:
            self.weight.fill(1)
        if self.bias is not None:
            self.bias.fill(0)

    # -------------------------------------------------------------------------- compute

    def _check_input(self, x: np.ndarray) -> None:
        """Raise the error for an input of the wrong ndim, dtype or channel count."""
        nd = x.ndim
        if nd not in self._ndims:
            raise ValueError(f"expected {self._ndims_text} input (got {nd}D input)")
        if x.dtype != self._dtype and not (self._dtype == np.float32 and x.dtype in HALF_DTYPES):
            if x.dtype in FLOAT_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} holds {self._dtype.name} parameters but got a "
                    f"{x.dtype.name} input; convert the input (x.astype(numpy.{self._dtype.name}))"
                    f" or create the module with dtype=numpy.{x.dtype.name}")
            raise TypeError(f"expected a {self._dtype.name} input, got dtype {x.dtype}")
        axis = self.axis
        if not -nd <= axis < nd:
            raise np.exceptions.AxisError(axis, nd)
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels (num_features) along axis {axis}, "
                f"got input of shape {x.shape}")

    def forward(self, input: ArrayLike) -> np.ndarray:
        """Normalize ``input`` and return a new array of its shape, dtype and memory order.

        In training mode with ``track_running_stats``, this updates ``running_mean`` and
        ``running_var`` in place and increments ``num_batches_tracked``. In every mode it
        records (input reference, saved mean, saved invstd) for :meth:`backward`; the input is
        not copied, so do not modify it in place before calling :meth:`backward`.
        A call that raises changes nothing.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm2d(3)
        >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
        >>> y = bn.forward(x)                        # same as bn(x)
        >>> y.shape, y.dtype, bn.num_batches_tracked
        ((4, 3, 5, 5), dtype('float32'), 1)
        """
        x = input if isinstance(input, np.ndarray) else np.asarray(input)
        # Cheap checks first, so a bad call never reaches the running-stat update.
        if x.ndim not in self._ndims or x.dtype != self._dtype:
            self._check_input(x)
        frozen = self._frozen
        if frozen is not None and not self.training:
            if x.shape[self.axis] != self.num_features:
                self._check_input(x)
            mean, scale, shift, invstd = frozen
            y = normalize(x, mean, scale, shift, axis=self.axis, activation=self.activation,
                          negative_slope=self.negative_slope)
            self._saved = (x, mean, invstd, False, self.axis,
                           y if self.activation is not None else None)
            return y
        axis = self.axis
        try:
            C = x.shape[axis]
        except IndexError:
            C = None
        if C != self.num_features:
            self._check_input(x)

        training = self.training
        nbt, factor = self._step_factor()
        rm = self.running_mean
        rv = self.running_var
        bn_training = training or (rm is None and rv is None)
        if training and not self.track_running_stats:
            rm = rv = None
        biased = self._biased_scratch(rv) if training and not self.unbiased else None
        y, save_mean, save_invstd = batch_norm_forward(
            x, self.weight, self.bias, rm, rv if biased is None else biased, bn_training,
            factor, self.eps, axis=axis, activation=self.activation,
            negative_slope=self.negative_slope)
        if biased is not None:
            _stages.biased_update(rv, biased, factor, x.size // C)
        if nbt is not None:
            self.num_batches_tracked = nbt
        self._saved = (x, save_mean, save_invstd, bn_training, axis,
                       y if self.activation is not None else None)
        return y

    def __call__(self, input: ArrayLike) -> np.ndarray:
        """Same as :meth:`forward`.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(2)
        >>> print(np.round(bn(np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)), 4))
        [[-1.  0.]
         [ 1.  0.]]
        """
        return self.forward(input)

    def backward(self, grad_output: ArrayLike, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Gradient of the input of the last :meth:`forward`, given that of its output.

        Accumulates ``grad_weight`` and ``grad_bias`` (when ``affine``): the first call after
        construction or :meth:`zero_grad` sets them, later ones add to them in place. Uses the
        current ``weight``. May be called several times for the same forward (each call
        accumulates again). Batch statistics (training mode, or no running statistics) give
        the full gradient through the mean and variance; running ones give
        ``weight * invstd * grad_output``. ``out``: where to write the input's gradient
        (see :func:`cbn.batch_norm_backward`; may be ``grad_output`` itself).

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> rng = np.random.default_rng(0)
        >>> bn = cbn.BatchNorm1d(3, dtype=np.float64)
        >>> x = rng.normal(2.0, 3.0, (16, 3))
        >>> y = bn(x)
        >>> grad_y = rng.standard_normal(y.shape)
        >>> grad_x = bn.backward(grad_y)
        >>> np.allclose(bn.grad_bias, grad_y.sum(axis=0))
        True
        >>> np.allclose(bn.grad_weight, (grad_y * y).sum(axis=0))   # y = xhat here
        True
        >>> _ = bn.backward(grad_y)                  # a second call accumulates
        >>> np.allclose(bn.grad_bias, 2 * grad_y.sum(axis=0))
        True
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() needs a forward() first: "
                               "there is no forward call to differentiate")
        x, save_mean, save_invstd, bn_training, axis, output = saved
        g = grad_output if isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
        if g.shape != x.shape:
            raise ValueError(f"grad_output has shape {g.shape}, expected {x.shape} "
                             "(the shape of the last forward's input and output)")
        if g.dtype not in FLOAT_DTYPES and g.dtype not in HALF_DTYPES:
            raise TypeError(f"grad_output must be a floating-point array, got dtype {g.dtype}")
        grad_input, grad_weight, grad_bias = batch_norm_backward(
            g, x, self.weight, save_mean, save_invstd, bn_training, axis=axis,
            activation=self.activation, out=out, negative_slope=self.negative_slope,
            output=output if _activations.from_output(_activations.KINDS[self.activation])
            else None, bias=self.bias)
        self._accumulate_grads(grad_weight, grad_bias)
        return grad_input

    # ------------------------------------------- shared with SyncBatchNorm (one home each)

    def _step_factor(self) -> Tuple[Optional[int], float]:
        """``(num_batches_tracked after this call or None, momentum factor)`` for a forward
        in the current mode: the factor is ``1/num_batches_tracked`` for ``momentum=None``
        (a cumulative average). The counter stops at the largest int64, where it stays (a
        state dict must still hold it)."""
        momentum = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            nbt = self.num_batches_tracked + 1
            if nbt > _COUNTER_MAX:
                nbt = _COUNTER_MAX
            return nbt, (1.0 / nbt if momentum is None else momentum)
        return None, (0.0 if momentum is None else momentum)

    def _biased_scratch(self, running_var: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """For ``unbiased=False`` (and a running variance to update): the scratch vector of
        zeros that receives the kernels' unbiased update, which then holds
        ``momentum * var * n / (n - 1)``; :func:`cbn._stages.biased_update` finishes it.
        None otherwise (the kernels update ``running_var`` directly)."""
        if self.unbiased or running_var is None:
            return None
        return np.zeros_like(running_var)

    def _accumulate_grads(self, grad_weight: Optional[np.ndarray],
                          grad_bias: Optional[np.ndarray]) -> None:
        """Add one backward's parameter gradients: set them after construction or
        :meth:`zero_grad`, add in place afterwards (parameters the module lacks: nothing)."""
        if self.weight is not None:
            if self.grad_weight is None:
                self.grad_weight = grad_weight
            else:
                self.grad_weight += grad_weight
        if self.bias is not None:
            if self.grad_bias is None:
                self.grad_bias = grad_bias
            else:
                self.grad_bias += grad_bias

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``grad_weight``/``grad_bias``: set them to None (default, like PyTorch) or
        fill them with zeros in place.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(2)
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
        >>> _ = bn.backward(np.ones_like(bn(x)))
        >>> print(bn.grad_bias)
        [2. 2.]
        >>> bn.zero_grad(set_to_none=False)
        >>> print(bn.grad_bias)
        [0. 0.]
        >>> bn.zero_grad()
        >>> print(bn.grad_bias)
        None
        """
        if set_to_none:
            self.grad_weight = None
            self.grad_bias = None
        else:
            for g in (self.grad_weight, self.grad_bias):
                if g is not None:
                    g.fill(0)

    # ------------------------------------------------------------------------- inference

    def freeze(self: _BN) -> _BN:
        """Switch to eval mode with the per-channel vectors computed once.

        ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias`` are computed now,
        so each later eval call is one pass over the data and no arithmetic on C-sized
        vectors (results identical to the unfrozen eval). Later in-place changes to
        ``weight``, ``bias`` or the running statistics are not seen until :meth:`freeze`
        is called again; :meth:`load_state_dict` refreezes, :meth:`train` and
        :meth:`unfreeze` undo it. Needs running statistics. Returns self.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm2d(3)
        >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
        >>> _ = bn(x)                                # one training step
        >>> y_eval = bn.eval()(x)
        >>> bn.freeze().frozen, bn.training
        (True, False)
        >>> np.array_equal(bn(x), y_eval)
        True
        """
        if self.running_mean is None or self.running_var is None:
            raise ValueError(f"{type(self).__name__}.freeze() needs running statistics "
                             "(track_running_stats=True)")
        invstd, scale, shift = eval_parameters(self.weight, self.bias, self.running_var,
                                               self.eps, self._dtype)
        self.eval()
        self._frozen = (self.running_mean.copy(), scale, shift, invstd)
        return self

    def unfreeze(self: _BN) -> _BN:
        """Drop the vectors :meth:`freeze` computed (the mode is unchanged); returns self.

        Examples
        --------
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(3).freeze().unfreeze()
        >>> bn.frozen, bn.training
        (False, False)
        """
        self._frozen = None
        return self

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` is in effect.

        Examples
        --------
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(3)
        >>> bn.frozen, bn.freeze().frozen, bn.train().frozen
        (False, True, False)
        """
        return self._frozen is not None

    def fold_into(self, weight: ArrayLike, bias: Optional[ArrayLike] = None, *,
                  transpose: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """This module (eval statistics) folded into the preceding Linear/Conv layer's
        ``weight`` and ``bias``: see :func:`cbn.fold`.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> bn = cbn.BatchNorm1d(2, dtype=np.float64).eval()
        >>> bn.running_mean[:] = [1.0, -1.0]
        >>> bn.running_var[:] = [4.0, 0.25]
        >>> W, b = np.eye(2), np.zeros(2)
        >>> W_fused, b_fused = bn.fold_into(W, b)
        >>> x = np.array([[3.0, 0.0]])
        >>> np.allclose(x @ W_fused.T + b_fused, bn(x @ W.T + b))
        True
        """
        from .fusion import fold
        return fold(weight, bias, self, transpose=transpose)


_SUBCLASS_PARAMETERS = """
    Parameters
    ----------
    num_features : int
        C, the number of channels (the size of the input along ``axis``).
    eps : float, default 1e-5
        Added to the variance (0 allowed).
    momentum : float or None, default 0.1
        Weight of a new batch in the running statistics; None gives the cumulative moving
        average (simple mean over ``num_batches_tracked`` batches).
    affine : bool, default True
        Learnable ``weight`` (ones) and ``bias`` (zeros); without them both are None.
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``;
        without them all three are None and eval mode also uses batch statistics.
    dtype : float32 or float64, keyword-only, default float32
        dtype of the parameters and buffers; inputs must have this dtype (a float32 module
        also takes float16 and bfloat16 inputs, computed in float32).
    axis : int, keyword-only, default 1
        The channel axis: {axes}.
    activation : None or str, keyword-only, default None
        Applied to the output in the same pass (``act(bn(x))``, see :class:`BatchNorm`);
        :meth:`~BatchNorm.backward` takes it into account.
    negative_slope : float, keyword-only, default 0.01
        leaky_relu's slope below 0 (see :class:`BatchNorm`).
    bias : bool, keyword-only, default True
        With ``affine``, whether there is a ``bias`` (``bias=False``: a weight without a
        bias, as in PyTorch).
    unbiased : bool, keyword-only, default True
        The running-variance convention: True (PyTorch's) updates it with the unbiased
        batch variance, False (Keras', ONNX's) with the biased one. The output is the same.

    Attributes, methods and the state dict are those of :class:`BatchNorm`.

    Examples
    --------"""


def _subclass_doc(summary: str, axes: str, examples: str) -> str:
    """The docstring of BatchNorm1d/2d/3d: ``summary``, the parameters they share (the
    channel axes described by ``axes``), and ``examples`` (indented as in a class body)."""
    return summary + "\n" + _SUBCLASS_PARAMETERS.format(axes=axes) + examples


class BatchNorm1d(BatchNorm):
    __doc__ = _subclass_doc(
        ":class:`BatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs, like "
        "``torch.nn.BatchNorm1d``.",
        "1 for ``(N, C)`` and ``(N, C, L)``, -1 for channels-last", """
    >>> import numpy as np
    >>> import cbn
    >>> bn = cbn.BatchNorm1d(3)
    >>> x = np.random.default_rng(0).normal(4.0, 2.0, (20, 3, 7)).astype(np.float32)
    >>> y = bn(x)
    >>> np.allclose(y.mean(axis=(0, 2)), 0, atol=1e-5)
    True
    >>> bn(x[:, :, 0]).shape                   # (N, C) works too
    (20, 3)
    """)

    _ndims = frozenset((2, 3))
    _ndims_text = "2D or 3D"


class BatchNorm2d(BatchNorm):
    __doc__ = _subclass_doc(
        ":class:`BatchNorm` for ``(N, C, H, W)`` inputs, like ``torch.nn.BatchNorm2d``.",
        "1 for ``(N, C, H, W)``, -1 for channels-last ``(N, H, W, C)``", """
    >>> import numpy as np
    >>> import cbn
    >>> bn = cbn.BatchNorm2d(3)
    >>> x = np.random.default_rng(0).normal(4.0, 2.0, (8, 3, 5, 5)).astype(np.float32)
    >>> y = bn(x)
    >>> np.allclose(y.std(axis=(0, 2, 3)), 1, atol=1e-3)
    True
    >>> bn(x[0])
    Traceback (most recent call last):
        ...
    ValueError: expected 4D input (got 3D input)
    """)

    _ndims = frozenset((4,))
    _ndims_text = "4D"


class BatchNorm3d(BatchNorm):
    __doc__ = _subclass_doc(
        ":class:`BatchNorm` for ``(N, C, D, H, W)`` inputs, like "
        "``torch.nn.BatchNorm3d``.",
        "1 for ``(N, C, D, H, W)``, -1 for channels-last ``(N, D, H, W, C)``", """
    >>> import numpy as np
    >>> import cbn
    >>> bn = cbn.BatchNorm3d(2, dtype=np.float64).eval()
    >>> x = np.random.default_rng(0).standard_normal((2, 2, 3, 4, 5))
    >>> np.allclose(bn(x), x / np.sqrt(1 + bn.eps))   # fresh running stats: 0 and 1
    True
    """)

    _ndims = frozenset((5,))
    _ndims_text = "5D"


_state.register(BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)
