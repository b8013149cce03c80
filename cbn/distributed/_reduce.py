"""Deterministic sums over the ranks: all_reduce and all_reduce_grads.
(Part of :mod:`cbn.distributed`.)"""

from __future__ import annotations

import zlib
from typing import Any, List, Optional, Sequence

import numpy as np

from ..modules import BatchNorm
from ._adapters import Communicator, as_communicator
from ._exchange import _OP_ALLREDUCE, _channel, _exchange, _rank_sum
from ._sync import SyncBatchNorm

__all__ = ["all_reduce", "all_reduce_grads"]

# ------------------------------------------------------------------------ gradient sums


def all_reduce(arrays: Sequence[np.ndarray], comm: Any = None, *,
               average: bool = False) -> List[np.ndarray]:
    """Sum each array over the ranks, in place: deterministic (float64, rank order, so every
    rank gets bit-identical results), one exchange for all of them. ``average`` divides by
    the number of ranks. Every rank passes arrays of the same shapes, in the same order.
    Returns ``arrays`` (as a list).

    Examples
    --------
    Two ranks (threads), each with two gradients:

    >>> import threading
    >>> import numpy as np
    >>> from cbn.distributed import ThreadCommunicator, all_reduce
    >>> grads = [[np.array([1.0, 2.0]), np.array([[0.5]], np.float32)],
    ...          [np.array([3.0, 4.0]), np.array([[1.5]], np.float32)]]
    >>> comms = ThreadCommunicator.create(2)
    >>> def rank(r):
    ...     all_reduce(grads[r], comms[r])
    >>> threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> grads[0]
    [array([4., 6.]), array([[2.]], dtype=float32)]
    >>> grads[1]
    [array([4., 6.]), array([[2.]], dtype=float32)]

    The arrays are written in place, so they must be writable floating-point arrays:

    >>> all_reduce([[1.0, 2.0]], ThreadCommunicator.create(1)[0])
    Traceback (most recent call last):
    ...
    TypeError: arrays[0] must be a writable floating-point numpy.ndarray, got list
    """
    arrays = list(arrays)
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or not a.flags.writeable:
            raise TypeError(f"arrays[{i}] must be a writable floating-point numpy.ndarray, "
                            f"got {type(a).__name__}"
                            + (f" of dtype {a.dtype}" if isinstance(a, np.ndarray) else ""))
    ch = _channel(comm)
    if ch.size == 1:
        return arrays
    flat = (np.concatenate([a.astype(np.float64).reshape(-1) for a in arrays])
            if arrays else np.zeros(0))
    key = zlib.crc32(repr([(a.shape, a.dtype.str) for a in arrays]).encode())
    _, pay = _exchange(ch, _OP_ALLREDUCE, flat, c=flat.size, aux=len(arrays), key=key)
    total = _rank_sum(pay, [True] * ch.size)
    if average:
        total /= ch.size
    off = 0
    for a in arrays:
        a[...] = total[off:off + a.size].reshape(a.shape)
        off += a.size
    return arrays


def _modules(modules: Any, what: str) -> List[BatchNorm]:
    mods = [modules] if isinstance(modules, BatchNorm) else list(modules)
    for i, m in enumerate(mods):
        if not isinstance(m, BatchNorm):
            raise TypeError(f"{what}: modules[{i}] is a {type(m).__name__}, expected a "
                            "cbn.BatchNorm (or SyncBatchNorm)")
    if len({id(m) for m in mods}) != len(mods):
        raise ValueError(f"{what}: a module is listed more than once")
    return mods


def _common_comm(mods: List[BatchNorm], comm: Any, what: str) -> Optional[Communicator]:
    """``comm``'s adapter, else the SyncBatchNorm modules' shared one, else None."""
    if comm is not None:
        return as_communicator(comm)
    comms = {id(m.comm): m.comm for m in mods if isinstance(m, SyncBatchNorm)}
    if len(comms) > 1:
        raise ValueError(f"{what}: the SyncBatchNorm modules use different communicators; "
                         "pass comm=")
    return next(iter(comms.values()), None)


def all_reduce_grads(modules: Any, comm: Any = None, *, average: bool = False) -> None:
    """Sum ``grad_weight``/``grad_bias`` of ``modules`` (a module or a sequence) over the
    ranks, in place and in one exchange (see :func:`all_reduce`); a gradient that is None
    counts as zeros and is allocated (only for parameters the module has: none without
    ``affine``, no ``grad_bias`` with ``bias=False``). ``comm`` defaults to the
    SyncBatchNorm modules' communicator (else ``MPI.COMM_WORLD``).

    Examples
    --------
    After a synchronized backward, each rank holds its own contribution to the
    gradients; their sum is the gradient of one process on the whole batch:

    >>> import threading
    >>> import numpy as np
    >>> import cbn
    >>> from cbn.distributed import ThreadCommunicator, all_reduce_grads
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(2.0, 3.0, (8, 3)).astype(np.float32)
    >>> dy = rng.standard_normal((8, 3)).astype(np.float32)
    >>> comms = ThreadCommunicator.create(2)
    >>> bns = [cbn.SyncBatchNorm(3, comm=c) for c in comms]
    >>> def rank(r):
    ...     part = slice(4 * r, 4 * r + 4)
    ...     bns[r].forward(x[part])
    ...     bns[r].backward(dy[part])
    ...     all_reduce_grads(bns[r])              # over bns[r].comm
    >>> threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> whole = cbn.BatchNorm1d(3)                # one process, the whole batch
    >>> _ = whole.forward(x)
    >>> _ = whole.backward(dy)
    >>> np.allclose(bns[0].grad_weight, whole.grad_weight, atol=1e-5)
    True
    >>> np.allclose(bns[0].grad_bias, whole.grad_bias, atol=1e-5)
    True
    >>> np.array_equal(bns[0].grad_weight, bns[1].grad_weight)
    True
    """
    mods = [m for m in _modules(modules, "all_reduce_grads") if m.affine]
    c = _common_comm(mods, comm, "all_reduce_grads")
    grads = []
    for m in mods:
        for name, param in (("grad_weight", m.weight), ("grad_bias", m.bias)):
            if param is None:
                continue
            if getattr(m, name) is None:
                setattr(m, name, np.zeros(m.num_features, m.dtype))
            grads.append(getattr(m, name))
    all_reduce(grads, c, average=average)
