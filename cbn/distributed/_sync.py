"""SyncBatchNorm: BatchNorm whose training statistics are those of all ranks' batches.
(Part of :mod:`cbn.distributed`.)"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, NamedTuple, Optional

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .. import _stages
from .._stages import Moments
from .._checks import COMPUTE as _COMPUTE
from ..modules import BatchNorm
from ._adapters import Communicator, as_communicator
from ._exchange import (_F_COUNT, _OP_BACKWARD, _OP_FORWARD, _Channel, _channel, _dtype_code,
                        _exchange, _rank_sum, _send_failure, _shape_of)

__all__ = ["SyncBatchNorm"]

# ----------------------------------------------------------------------------- the module

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class _Record(NamedTuple):
    """What the synchronized backward needs from the last synchronized forward."""

    x: np.ndarray
    save_mean: Optional[np.ndarray]
    save_invstd: Optional[np.ndarray]
    count: int            # values per channel over all ranks
    axis: int


class SyncBatchNorm(BatchNorm):
    """:class:`cbn.BatchNorm` whose training statistics are those of all ranks' batches.

    Same parameters (``bias`` and ``unbiased`` included), buffers, state_dict, converters,
    train/eval and explicit backward as :class:`cbn.BatchNorm` (any input from 2D to 5D),
    plus ``comm``: see the :mod:`cbn.distributed` docstring (None: mpi4py's
    ``MPI.COMM_WORLD``). Training-mode :meth:`forward` and :meth:`backward` are collective:
    every rank calls them in the same order (a rank may pass an empty batch, shape 0 along a
    non-channel axis).

    Training forward: local (count, mean, M2) in float64, one exchange, Chan's merge in
    rank order, then the running-statistic update (with the unbiased variance of the whole
    batch, or the biased one for ``unbiased=False``) and the normalization; every rank
    holds bit-identical statistics. A global count of one value per channel raises the
    same ValueError on every rank; a batch empty on every rank returns an empty output and
    changes nothing. Backward: local ``sum(dy)`` and ``sum(dy * (x - mean))``, one exchange
    summed in rank order, then the input gradient with the global count.
    ``grad_weight``/``grad_bias`` are this rank's contributions, as in PyTorch: sum them
    over the ranks with :func:`all_reduce_grads` (or together with the other parameters'
    gradients, :func:`all_reduce`).

    Eval mode and a communicator of size 1 do no communication and are exactly
    :class:`cbn.BatchNorm` (eval without running statistics normalizes each rank with its
    own batch, as torch.nn.SyncBatchNorm does).

    Copies (``copy.deepcopy``) share the communicator; pickles leave it out, and an
    unpickled module uses ``MPI.COMM_WORLD`` until :attr:`comm` is set.

    Parameters
    ----------
    num_features : int
        C, the number of channels (the size of the input along ``axis``).
    eps : float, default 1e-5
        Added to the variance (0 allowed).
    momentum : float or None, default 0.1
        Weight of a new batch in the running statistics; None gives the cumulative moving
        average.
    affine : bool, default True
        Learnable ``weight`` (ones) and ``bias`` (zeros); without them both are None.
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    dtype : float32 or float64, keyword-only, default float32
        dtype of the parameters and buffers.
    axis : int, keyword-only, default 1
        The channel axis: 1 for ``(N, C, *)``, -1 for channels-last.
    bias : bool, keyword-only, default True
        With ``affine``, whether there is a ``bias``.
    unbiased : bool, keyword-only, default True
        The running-variance convention (see :class:`cbn.BatchNorm`).
    comm : communicator or None, keyword-only, default None
        The ranks to synchronize with: an mpi4py communicator, a torch.distributed process
        group (gloo), a :class:`ThreadCommunicator` rank or any object with ``rank``,
        ``size`` and ``allgather`` (see :func:`as_communicator`); None is mpi4py's
        ``MPI.COMM_WORLD``.

    Examples
    --------
    Two ranks as threads (with MPI: one process per rank, ``comm=None``):

    >>> import threading
    >>> import numpy as np
    >>> import cbn
    >>> from cbn.distributed import ThreadCommunicator
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (8, 3, 4)).astype(np.float32)
    >>> comms = ThreadCommunicator.create(2)
    >>> out = [None, None]
    >>> def rank(r):
    ...     bn = cbn.SyncBatchNorm(3, comm=comms[r])
    ...     out[r] = bn(x[4 * r:4 * r + 4]), bn.running_mean
    >>> threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> whole = cbn.BatchNorm1d(3)
    >>> y = whole(x)                       # one process, the whole batch
    >>> np.allclose(np.concatenate([out[0][0], out[1][0]]), y, atol=1e-5)
    True
    >>> np.array_equal(out[0][1], out[1][1]), np.allclose(out[0][1], whole.running_mean)
    (True, True)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 dtype: DTypeLike = np.float32, axis: int = 1, bias: bool = True,
                 unbiased: bool = True, comm: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         dtype=dtype, axis=axis, bias=bias, unbiased=unbiased)
        self._comm: Optional[Communicator] = as_communicator(comm)
        self._sync: Optional[_Record] = None

    @property
    def comm(self) -> Communicator:
        """The communicator (an adapter: see :func:`as_communicator`).

        Examples
        --------
        >>> import cbn
        >>> from cbn.distributed import ThreadCommunicator
        >>> bn = cbn.SyncBatchNorm(4, comm=ThreadCommunicator.create(1)[0])
        >>> bn.comm.rank, bn.comm.size
        (0, 1)"""
        if self._comm is None:
            self._comm = as_communicator(None)
        return self._comm

    @comm.setter
    def comm(self, comm: Any) -> None:
        self._comm = as_communicator(comm)

    @classmethod
    def from_module(cls, bn: BatchNorm, comm: Any = None) -> "SyncBatchNorm":
        """A SyncBatchNorm with ``bn``'s settings, mode and state. Like
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, it shares ``bn``'s arrays
        (weight, bias, running statistics, gradients), so optimizers holding them keep
        working; ``bn`` itself is unchanged otherwise. Fused activations are not supported.

        Examples
        --------
        >>> import cbn
        >>> from cbn.distributed import ThreadCommunicator
        >>> bn = cbn.BatchNorm2d(8)
        >>> sbn = cbn.SyncBatchNorm.from_module(bn, ThreadCommunicator.create(1)[0])
        >>> sbn.running_mean is bn.running_mean, sbn.num_features
        (True, 8)"""
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"bn must be a cbn.BatchNorm, got {type(bn).__name__}")
        if getattr(bn, "activation", None) is not None:
            raise ValueError(f"SyncBatchNorm has no fused activation; bn has "
                             f"activation={bn.activation!r}")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  dtype=bn.dtype, axis=bn.axis, bias=bn.bias is not None,
                  unbiased=bn.unbiased, comm=comm)
        for name in ("weight", "bias", "running_mean", "running_var", "grad_weight",
                     "grad_bias", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        new.train(bn.training)
        return new

    # --------------------------------------------------------------------------- compute

    def _check_train_input(self, x: np.ndarray) -> int:
        """Validate a training input as BatchNorm does; returns the channel axis."""
        self._check_input(x)
        return self.axis % x.ndim

    def forward(self, input: ArrayLike) -> np.ndarray:
        """Normalize ``input``: see the class docstring; collective in training mode when
        the communicator has more than one rank. A call that raises changes nothing.

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> from cbn.distributed import ThreadCommunicator
        >>> bn = cbn.SyncBatchNorm(2, comm=ThreadCommunicator.create(1)[0])
        >>> y = bn.forward(np.arange(8, dtype=np.float32).reshape(4, 2))
        >>> np.round(y[:, 0], 3)
        array([-1.342, -0.447,  0.447,  1.342], dtype=float32)"""
        if self.training:
            ch = _channel(self.comm)
            if ch.size > 1:
                return self._forward_sync(input, ch)
        y = super().forward(input)
        self._sync = None
        return y

    def _forward_sync(self, input: ArrayLike, ch: _Channel) -> np.ndarray:
        C = self.num_features
        try:
            x = input if isinstance(input, np.ndarray) else np.asarray(input)
            axis = self._check_train_input(x)
            nbt, factor = self._step_factor()
            if x.size:
                mom = _stages.moments(x, axis=axis)
            else:
                mom = Moments(0, np.zeros(C), np.zeros(C))
        except Exception:
            _send_failure(ch, _OP_FORWARD)
            raise
        heads, pay = _exchange(ch, _OP_FORWARD, np.concatenate([mom.mean, mom.m2]),
                               c=C, dtype=_dtype_code(x.dtype), eps=self.eps, aux=factor,
                               flags=self._settings_key(), count=mom.count, shape=x.shape)
        counts = [int(v) for v in heads[:, _F_COUNT]]
        total = sum(counts)
        if total == 0:
            self._sync = _Record(x, None, None, 0, axis)
            return np.empty_like(x)
        if total == 1:
            sizes = ", ".join(f"{_shape_of(h)} (rank {r})" for r, h in enumerate(heads))
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"input size {sizes}")
        merged = _stages.merge_moments([Moments(counts[r], pay[r, :C], pay[r, C:])
                                        for r in range(ch.size)])
        track = self.track_running_stats
        rv = self.running_var if track else None
        biased = self._biased_scratch(rv)          # unbiased=False: as BatchNorm.forward
        stats = _stages.finish(
            merged, self.eps, dtype=_COMPUTE[x.dtype], weight=self.weight, bias=self.bias,
            running_mean=self.running_mean if track else None,
            running_var=rv if biased is None else biased, momentum=factor)
        if biased is not None:
            _stages.biased_update(rv, biased, factor, total)
        save_mean, save_invstd = stats.save_mean, stats.save_invstd
        if x.size:
            y = _stages.normalize(x, stats, axis=axis)
        else:
            y = np.empty_like(x)
        if nbt is not None:
            self.num_batches_tracked = nbt
        self._sync = _Record(x, save_mean, save_invstd, total, axis)
        return y

    def _settings_key(self) -> int:
        """The settings besides eps and momentum that change the shared statistics, for the
        exchange header: every rank must agree on them (bit 0: unbiased, bit 1:
        track_running_stats)."""
        return int(bool(self.unbiased)) | int(bool(self.track_running_stats)) << 1

    def backward(self, grad_output: ArrayLike, out: Optional[np.ndarray] = None
                 ) -> np.ndarray:
        """Gradient of the input of the last :meth:`forward` (see :meth:`BatchNorm.backward`);
        collective after a synchronized training forward. ``grad_weight``/``grad_bias``
        accumulate this rank's contributions only. ``out``: where to write the input's
        gradient, as for :meth:`BatchNorm.backward` (an array of the input's shape and
        dtype; may be ``grad_output`` itself).

        Examples
        --------
        >>> import numpy as np
        >>> import cbn
        >>> from cbn.distributed import ThreadCommunicator
        >>> bn = cbn.SyncBatchNorm(2, comm=ThreadCommunicator.create(1)[0])
        >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)
        >>> dx = bn.backward(np.ones_like(bn.forward(x)))
        >>> np.allclose(dx, 0, atol=1e-6), bn.grad_bias
        (True, array([4., 4.], dtype=float32))
        """
        rec = self._sync
        if rec is None:
            return super().backward(grad_output, out=out)
        ch = _channel(self.comm)
        x, save_mean, save_invstd, total, axis = rec
        C = self.num_features
        dtype = _COMPUTE[x.dtype]
        try:
            g = grad_output if isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
            if g.shape != x.shape:
                raise ValueError(f"grad_output has shape {g.shape}, expected {x.shape} "
                                 "(the shape of the last forward's input and output)")
            if g.dtype not in _COMPUTE:
                raise TypeError("grad_output must be a floating-point array, got dtype "
                                f"{g.dtype}")
            if out is not None and (not isinstance(out, np.ndarray) or out.shape != x.shape
                                    or out.dtype != x.dtype or not out.flags.writeable):
                raise ValueError(
                    f"out must be a writable numpy.ndarray of shape {x.shape} and dtype "
                    f"{x.dtype} (the input's), got "
                    + (f"{out.dtype} {out.shape}" + ("" if out.flags.writeable
                                                    else " read-only")
                       if isinstance(out, np.ndarray) else type(out).__name__))
            gc = g if g.dtype == dtype else g.astype(dtype)
            xc = x if x.dtype == dtype else x.astype(dtype)
            if x.size and total:
                sum_dy, sum_dy_xmu = _stages.backward_reduce(gc, xc, save_mean, axis=axis)
            else:
                sum_dy, sum_dy_xmu = np.zeros(C), np.zeros(C)
        except Exception:
            if total:
                _send_failure(ch, _OP_BACKWARD)
            raise
        if total:       # every rank knows the global count: an all-empty batch skips this
            heads, pay = _exchange(ch, _OP_BACKWARD, np.concatenate([sum_dy, sum_dy_xmu]),
                                   c=C, dtype=_dtype_code(x.dtype), eps=self.eps,
                                   aux=float(total), count=int(math.prod(x.shape)) // C,
                                   shape=x.shape, flags=self._settings_key())
            used = [h[_F_COUNT] > 0 for h in heads]
            tot_dy = _rank_sum(pay[:, :C], used)
            tot_dy_xmu = _rank_sum(pay[:, C:], used)
        if x.size:
            dx = _stages.backward_elements(gc, xc, self.weight, save_mean, save_invstd,
                                           tot_dy, tot_dy_xmu, total, axis=axis)
            if dx.dtype != x.dtype:
                dx = dx.astype(x.dtype)
        else:
            dx = np.empty_like(x)
        if out is not None:
            out[...] = dx
            dx = out
        gw = gb = None
        if self.weight is not None:
            gw = (np.zeros(C, dtype=dtype) if save_invstd is None else
                  (sum_dy_xmu * save_invstd.astype(np.float64)).astype(dtype))
        if self.bias is not None:
            gb = sum_dy.astype(dtype)
        self._accumulate_grads(gw, gb)
        return dx

    # ------------------------------------------------------------------- pickle and copy

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(super().__getstate__())
        state["_sync"] = None
        state["_comm"] = None          # communicators do not travel between processes
        return state

    def __deepcopy__(self, memo: Dict[int, Any]) -> "SyncBatchNorm":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        new.__setstate__(copy.deepcopy(state, memo))
        new._comm = self._comm         # a copy shares the communicator
        return new
