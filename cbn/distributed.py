"""Batch normalization across processes: SyncBatchNorm, PreciseBN, communicator adapters.

Data-parallel training splits each batch over several processes ("ranks"); BN's statistics
must then be those of the whole batch. :class:`SyncBatchNorm` computes each rank's local
moments (count, mean, M2) in float64 with the kernels' moments stage, exchanges them in one
collective, merges them in rank order with Chan's formula and normalizes with the result.
Every rank performs the same float64 operations on the same numbers, so every rank holds
bit-identical statistics and running statistics, and the result equals one process on the
concatenated batch up to rounding (no ``E[x^2] - E[x]^2`` anywhere). The backward exchanges
``sum(dy)`` and ``sum(dy * (x - mean))`` the same way.

:func:`precise_statistics` (PreciseBN) replaces the running statistics, an exponential
average over recent batches, by the exact population statistics of every value seen during
a number of training-mode forward calls, merged over all ranks.

Communicators
-------------
``comm`` is any of:

* an mpi4py communicator (duck-typed: an object with ``Allgather``, ``Get_rank`` and
  ``Get_size``; mpi4py is never imported unless ``comm`` is None), e.g. ``MPI.COMM_WORLD``;
* a ``torch.distributed`` process group (gloo works on the CPU), or
  :class:`TorchCommunicator` for the default group;
* :class:`ThreadCommunicator` ranks: threads of one process (for tests and experiments);
* any object with the protocol below;
* None: ``mpi4py.MPI.COMM_WORLD`` (``pip install "cbn[mpi]"``).

The protocol (:class:`Communicator`) is three members:

``rank`` (int), ``size`` (int)
    This process's index in the group and the number of processes.
``allgather(buf) -> array``
    ``buf`` is a 1-D float64 array of the same length on every rank; returns a float64
    array of shape ``(size, len(buf))`` (or a sequence of ``size`` 1-D arrays) whose row
    ``r`` is rank ``r``'s ``buf``. Collective: every rank calls it, in the same order.

Every exchange cbn makes starts with a fixed-size block (a header and up to
``FIRST_BLOCK`` = 512 payload values), so ranks whose calls disagree (different number of
channels, input dtype, eps, momentum, operation or position in the call sequence) exchange
buffers of equal length, see the disagreement in the headers and all raise
:class:`CollectiveError`: none is left waiting in a collective. A rank whose input fails
validation takes part in the exchange with an error flag before raising its own error, so
the others raise :class:`CollectiveError` instead of waiting. What no protocol can help is a
rank that never calls at all (it crashed, or skipped a step): run MPI programs with
``python -m mpi4py script.py`` so that an uncaught exception aborts every rank.

Payloads larger than ``FIRST_BLOCK`` values (more than 256 channels) take a second,
exact-size collective after the headers have been checked.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
import sys
import threading
import time
import zlib
from typing import (Any, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _stages
from ._stages import Moments
from ._checks import COMPUTE as _COMPUTE
from .modules import BatchNorm

__all__ = ["Communicator", "CollectiveError", "MPICommunicator", "TorchCommunicator",
           "ThreadCommunicator", "SyncBatchNorm", "as_communicator", "all_reduce",
           "all_reduce_grads", "communication_time", "precise_statistics",
           "measure_overhead"]


class CollectiveError(RuntimeError):
    """The ranks' calls disagree, or another rank failed: raised on every rank.

    Examples
    --------
    Two ranks (threads) whose calls disagree: both raise the same error, neither waits.

    >>> import threading
    >>> import numpy as np
    >>> from cbn.distributed import CollectiveError, ThreadCommunicator, all_reduce
    >>> comms = ThreadCommunicator.create(2)
    >>> errors = [None, None]
    >>> def rank(r):
    ...     try:
    ...         all_reduce([np.ones(3 + r)], comms[r])     # 3 values on rank 0, 4 on rank 1
    ...     except CollectiveError as e:
    ...         errors[r] = str(e)
    >>> threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> errors[0] == errors[1]
    True
    >>> print(errors[0])
    all_reduce: the ranks' calls disagree ...: channels: rank 0 3, rank 1 4; ...
    >>> issubclass(CollectiveError, RuntimeError)
    True
    """


@runtime_checkable
class Communicator(Protocol):
    """What cbn needs from a communicator (see the module docstring).

    Examples
    --------
    Any object with ``rank``, ``size`` and ``allgather`` is one, e.g. a single process:

    >>> import numpy as np
    >>> import cbn
    >>> from cbn.distributed import Communicator, ThreadCommunicator, as_communicator
    >>> class Alone:
    ...     rank, size = 0, 1
    ...     def allgather(self, buf):
    ...         return np.asarray(buf, dtype=np.float64).reshape(1, -1)
    >>> alone = Alone()
    >>> isinstance(alone, Communicator), isinstance(ThreadCommunicator.create(1)[0],
    ...                                             Communicator)
    (True, True)
    >>> as_communicator(alone) is alone, cbn.SyncBatchNorm(3, comm=alone).comm is alone
    (True, True)
    """

    rank: int
    size: int

    def allgather(self, buf: np.ndarray) -> Any:
        """Row r of the result is rank r's ``buf`` (1-D float64, same length everywhere).

        Collective: every rank of the group calls it, in the same order.

        Examples
        --------
        >>> import numpy as np
        >>> from cbn.distributed import ThreadCommunicator
        >>> comm = ThreadCommunicator.create(1)[0]         # a group of one rank
        >>> comm.allgather(np.array([1.0, 2.0]))
        array([[1., 2.]])
        """
        ...


# ------------------------------------------------------------------------------ adapters


class MPICommunicator:
    """An mpi4py communicator (or anything with ``Allgather``, ``Get_rank``, ``Get_size``)
    as a :class:`Communicator`: one ``Allgather`` of float64 buffers per exchange.

    Examples
    --------
    With mpi4py (under ``mpiexec -n 4``, or a plain process: a world of one rank; the
    lines that need mpi4py are not run as doctests):

    >>> from mpi4py import MPI                                   # doctest: +SKIP
    >>> from cbn.distributed import MPICommunicator
    >>> MPICommunicator(MPI.COMM_WORLD)                          # doctest: +SKIP
    MPICommunicator(rank=0, size=1)

    The methods are duck-typed; here one process stands in for mpi4py:

    >>> class One:
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    ...     def Allgather(self, send, recv): recv[0] = send
    >>> MPICommunicator(One())
    MPICommunicator(rank=0, size=1)
    >>> MPICommunicator(object())
    Traceback (most recent call last):
    ...
    TypeError: comm must be an mpi4py communicator ..., got object
    """

    def __init__(self, comm: Any) -> None:
        for name in ("Allgather", "Get_rank", "Get_size"):
            if not callable(getattr(comm, name, None)):
                raise TypeError(f"comm must be an mpi4py communicator (with Allgather, "
                                f"Get_rank and Get_size), got {type(comm).__name__}")
        self.comm = comm
        self.rank: int = int(comm.Get_rank())
        self.size: int = int(comm.Get_size())

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        """``buf`` as float64 from every rank: one ``Allgather`` into a new array of shape
        ``(size, len(buf))`` whose row r is rank r's ``buf``. Collective.

        Examples
        --------
        >>> import numpy as np
        >>> from mpi4py import MPI                                   # doctest: +SKIP
        >>> from cbn.distributed import MPICommunicator
        >>> comm = MPICommunicator(MPI.COMM_WORLD)                   # doctest: +SKIP
        >>> class One:                      # one process, standing in for mpi4py
        ...     def Get_rank(self): return 0
        ...     def Get_size(self): return 1
        ...     def Allgather(self, send, recv): recv[0] = send
        >>> comm = MPICommunicator(One())
        >>> comm.allgather(np.arange(3))            # on 4 ranks: shape (4, 3)
        array([[0., 1., 2.]])
        """
        buf = np.ascontiguousarray(buf, dtype=np.float64)
        out = np.empty((self.size, buf.size), dtype=np.float64)
        self.comm.Allgather(buf, out)
        return out

    def __repr__(self) -> str:
        return f"MPICommunicator(rank={self.rank}, size={self.size})"


class TorchCommunicator:
    """A ``torch.distributed`` process group as a :class:`Communicator` (``group=None``:
    the default group). The group must be initialized (``init_process_group``); on the CPU
    use the gloo backend. Each exchange is one ``all_gather`` of float64 tensors.

    Examples
    --------
    Without PyTorch, or before ``init_process_group``, it raises:

    >>> from cbn.distributed import TorchCommunicator
    >>> try:
    ...     TorchCommunicator()
    ... except (ImportError, RuntimeError) as e:
    ...     print(e)
    TorchCommunicator needs ...

    With a process group (here one of a single rank; the lines that need PyTorch and a
    process group are not run as doctests):

    >>> import torch.distributed as dist                         # doctest: +SKIP
    >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29500",
    ...                         rank=0, world_size=1)            # doctest: +SKIP
    >>> TorchCommunicator()                                      # doctest: +SKIP
    TorchCommunicator(rank=0, size=1)
    """

    def __init__(self, group: Any = None) -> None:
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            raise ImportError("TorchCommunicator needs PyTorch (pip install torch)") from None
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchCommunicator needs an initialized process group: call "
                               "torch.distributed.init_process_group('gloo', ...) first")
        self._torch = torch
        self._dist = dist
        self.group = group
        self.rank: int = int(dist.get_rank(group))
        self.size: int = int(dist.get_world_size(group))

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        """``buf`` as float64 from every rank: one ``all_gather`` over the group, stacked
        into an array of shape ``(size, len(buf))`` whose row r is rank r's ``buf``.
        Collective.

        Examples
        --------
        In a process group of four ranks (not run as a doctest: it needs PyTorch and an
        initialized process group):

        >>> import numpy as np
        >>> from cbn.distributed import TorchCommunicator
        >>> comm = TorchCommunicator()                               # doctest: +SKIP
        >>> comm.allgather(np.full(2, comm.rank))                    # doctest: +SKIP
        array([[0., 0.],
               [1., 1.],
               [2., 2.],
               [3., 3.]])
        """
        t = self._torch.from_numpy(np.ascontiguousarray(buf, dtype=np.float64))
        parts = [self._torch.empty_like(t) for _ in range(self.size)]
        self._dist.all_gather(parts, t, group=self.group)
        return np.stack([p.numpy() for p in parts])

    def __repr__(self) -> str:
        return f"TorchCommunicator(rank={self.rank}, size={self.size})"


class _ThreadGroup:
    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: List[Optional[np.ndarray]] = [None] * size


class ThreadCommunicator:
    """Ranks that are threads of one process: ``ThreadCommunicator.create(4)`` returns four
    communicators (ranks 0 to 3); give one to each thread. A rank that fails or does not
    join within ``timeout`` seconds breaks the group: every waiting rank then raises
    :class:`CollectiveError` (nothing hangs).

    Examples
    --------
    Three ranks, one thread each:

    >>> import threading
    >>> import numpy as np
    >>> from cbn.distributed import ThreadCommunicator
    >>> comms = ThreadCommunicator.create(3)
    >>> rows = [None] * 3
    >>> def rank(r):
    ...     rows[r] = comms[r].allgather(np.full(2, 10.0 * r))
    >>> threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> rows[0]
    array([[ 0.,  0.],
           [10., 10.],
           [20., 20.]])
    >>> np.array_equal(rows[1], rows[0]) and np.array_equal(rows[2], rows[0])
    True

    A rank that never joins: the others raise after ``timeout`` seconds.

    >>> comms = ThreadCommunicator.create(2, timeout=0.1)
    >>> comms[0].allgather(np.zeros(2))           # rank 1 never calls
    Traceback (most recent call last):
    ...
    cbn.distributed.CollectiveError: ThreadCommunicator: ... did not join the collective in time
    """

    def __init__(self, group: _ThreadGroup, rank: int) -> None:
        self._group = group
        self.rank: int = rank
        self.size: int = group.size

    @classmethod
    def create(cls, size: int, *, timeout: float = 60.0) -> List["ThreadCommunicator"]:
        """``size`` connected communicators, one per rank (``timeout``: seconds a rank
        waits in a collective for the others before the group breaks).

        Examples
        --------
        >>> from cbn.distributed import ThreadCommunicator
        >>> comms = ThreadCommunicator.create(4)
        >>> [c.rank for c in comms], comms[0].size
        ([0, 1, 2, 3], 4)
        >>> comms[2]
        ThreadCommunicator(rank=2, size=4)
        >>> ThreadCommunicator.create(0)
        Traceback (most recent call last):
        ...
        ValueError: size must be >= 1, got 0
        """
        size = _positive_int(size, "size")
        group = _ThreadGroup(size, float(timeout))
        return [cls(group, r) for r in range(size)]

    def abort(self) -> None:
        """Break the group: every rank waiting in (or later entering) a collective raises
        :class:`CollectiveError`. A broken group stays broken: create a new one.

        Examples
        --------
        >>> import numpy as np
        >>> from cbn.distributed import ThreadCommunicator
        >>> comms = ThreadCommunicator.create(2)
        >>> comms[1].abort()                     # rank 1 failed: it will not join
        >>> comms[0].allgather(np.zeros(3))
        Traceback (most recent call last):
        ...
        cbn.distributed.CollectiveError: ThreadCommunicator: another rank failed ...
        """
        self._group.barrier.abort()

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        """Row r of the result is rank r's ``buf`` (copied, as 1-D float64). Waits until
        every rank of the group has called it; raises :class:`CollectiveError` when the
        group is broken (a rank aborted, or did not join within the timeout) or the ranks'
        buffers have different lengths.

        Examples
        --------
        >>> import threading
        >>> import numpy as np
        >>> from cbn.distributed import ThreadCommunicator
        >>> ThreadCommunicator.create(1)[0].allgather([1, 2])
        array([[1., 2.]])

        Buffers of different lengths: every rank raises.

        >>> comms = ThreadCommunicator.create(2)
        >>> errors = [None, None]
        >>> def rank(r):
        ...     try:
        ...         comms[r].allgather(np.zeros(2 + r))
        ...     except Exception as e:
        ...         errors[r] = f"{type(e).__name__}: {e}"
        >>> threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
        >>> for t in threads: t.start()
        >>> for t in threads: t.join()
        >>> print(errors[0]); print(errors[1])
        CollectiveError: ThreadCommunicator.allgather: ... different lengths [2, 3]
        CollectiveError: ThreadCommunicator.allgather: ... different lengths [2, 3]
        """
        g = self._group
        g.slots[self.rank] = np.array(buf, dtype=np.float64, copy=True).reshape(-1)
        try:
            g.barrier.wait()
            slots = list(g.slots)
            g.barrier.wait()            # everyone has read before the next round writes
        except threading.BrokenBarrierError:
            raise CollectiveError("ThreadCommunicator: another rank failed or did not join "
                                  "the collective in time") from None
        if len({s.size for s in slots}) != 1:
            raise CollectiveError("ThreadCommunicator.allgather: the ranks' buffers have "
                                  f"different lengths {[s.size for s in slots]}")
        return np.stack(slots)

    def __repr__(self) -> str:
        return f"ThreadCommunicator(rank={self.rank}, size={self.size})"


def _positive_int(n: Any, name: str) -> int:
    if isinstance(n, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def _is_torch_group(comm: Any) -> bool:
    if "torch" not in sys.modules:
        return False
    t = type(comm)
    return t.__module__.startswith("torch") and "ProcessGroup" in t.__name__


def _world() -> Any:
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError("comm=None means mpi4py's MPI.COMM_WORLD, and mpi4py is not "
                          "installed: pip install 'cbn[mpi]' (mpi4py and the MPICH wheel), "
                          "or pass comm= (a torch.distributed group, a ThreadCommunicator, "
                          "...)") from None
    return MPI.COMM_WORLD


_ADAPTERS: Dict[int, Tuple[Any, Any]] = {}     # id(raw comm) -> (raw comm, adapter)
_LOCK = threading.Lock()


def as_communicator(comm: Any = None) -> Communicator:
    """The :class:`Communicator` cbn uses for ``comm`` (see the module docstring): the same
    adapter object for the same communicator, so call counts and timings are shared.

    Examples
    --------
    >>> from cbn.distributed import ThreadCommunicator, as_communicator
    >>> comm = ThreadCommunicator.create(1)[0]
    >>> as_communicator(comm) is comm                   # adapters are used as they are
    True
    >>> as_communicator()                               # doctest: +SKIP
    MPICommunicator(rank=0, size=1)

    An mpi4py-like communicator (here one process standing in for ``MPI.COMM_WORLD``)
    gets an :class:`MPICommunicator`, the same one on every call:

    >>> class One:
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    ...     def Allgather(self, send, recv): recv[0] = send
    >>> world = One()
    >>> adapter = as_communicator(world)
    >>> adapter, as_communicator(world) is adapter
    (MPICommunicator(rank=0, size=1), True)
    >>> as_communicator("world")
    Traceback (most recent call last):
    ...
    TypeError: comm must be an mpi4py communicator, ...; got str
    """
    if comm is None:
        comm = _world()
    if isinstance(comm, (MPICommunicator, TorchCommunicator, ThreadCommunicator)):
        return comm
    with _LOCK:
        hit = _ADAPTERS.get(id(comm))
        if hit is not None and hit[0] is comm:
            return hit[1]
    if all(callable(getattr(comm, n, None)) for n in ("Allgather", "Get_rank", "Get_size")):
        adapter: Any = MPICommunicator(comm)
    elif _is_torch_group(comm):
        adapter = TorchCommunicator(comm)
    elif (callable(getattr(comm, "allgather", None)) and isinstance(getattr(comm, "rank", None),
                                                                     numbers.Integral)
          and isinstance(getattr(comm, "size", None), numbers.Integral)):
        adapter = comm
    else:
        raise TypeError("comm must be an mpi4py communicator, a torch.distributed process "
                        "group, or an object with rank, size and allgather(ndarray) (see "
                        f"cbn.distributed); got {type(comm).__name__}")
    if not 0 <= adapter.rank < adapter.size:
        raise ValueError(f"comm has rank {adapter.rank} and size {adapter.size}: expected "
                         "0 <= rank < size")
    with _LOCK:
        _ADAPTERS[id(comm)] = (comm, adapter)
    return adapter


# ------------------------------------------------------------------------------ exchange

#: payload values carried by the first, fixed-size collective of every exchange
FIRST_BLOCK = 512

_MAGIC = float(0x63626E5E17)          # marks a cbn header (exactly representable)
# header fields (float64 each)
_F_MAGIC, _F_OP, _F_CALL, _F_STATUS, _F_C, _F_DTYPE, _F_EPS, _F_AUX, _F_KEY, _F_LEN, \
    _F_COUNT, _F_NDIM = range(12)
_F_SHAPE = 12                          # 5 slots
_H = _F_SHAPE + 5
#: fields every rank must agree on, and how messages name them
_AGREE = ((_F_OP, "operation"), (_F_CALL, "collective call number"), (_F_C, "channels"),
          (_F_DTYPE, "input dtype"), (_F_EPS, "eps"), (_F_AUX, "momentum factor / count"),
          (_F_KEY, "layout key"), (_F_LEN, "payload length"))

_OP_FORWARD, _OP_BACKWARD, _OP_PRECISE, _OP_ALLREDUCE = 1, 2, 3, 4
_OP_NAMES = {1: "SyncBatchNorm.forward", 2: "SyncBatchNorm.backward",
             3: "precise_statistics", 4: "all_reduce"}


def _dtype_code(dtype: np.dtype) -> int:
    if dtype == np.float16:
        return 1
    if dtype == np.float32:
        return 3
    if dtype == np.float64:
        return 4
    if dtype.name == "bfloat16":
        return 2
    return 9


_DTYPE_NAMES = {0: "-", 1: "float16", 2: "bfloat16", 3: "float32", 4: "float64", 9: "other"}


class _Channel:
    """A communicator with cbn's bookkeeping: the call counter and the time spent."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.rank = int(comm.rank)
        self.size = int(comm.size)
        self.calls = 0
        self.seconds = 0.0

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            res = self.comm.allgather(buf)
        finally:
            self.seconds += time.perf_counter() - t0
        rows = np.asarray(res if isinstance(res, np.ndarray) else np.stack(
            [np.asarray(r, dtype=np.float64).reshape(-1) for r in res]), dtype=np.float64)
        if rows.shape != (self.size, buf.size):
            raise CollectiveError(f"{type(self.comm).__name__}.allgather returned shape "
                                  f"{rows.shape}, expected {(self.size, buf.size)}")
        return rows


_CHANNELS: Dict[int, Tuple[Any, _Channel]] = {}


def _channel(comm: Any) -> _Channel:
    adapter = as_communicator(comm)
    with _LOCK:
        hit = _CHANNELS.get(id(adapter))
        if hit is None or hit[0] is not adapter:
            hit = (adapter, _Channel(adapter))
            _CHANNELS[id(adapter)] = hit
    return hit[1]


def communication_time(comm: Any = None) -> float:
    """Seconds this process has spent in cbn's collectives on ``comm`` (including waiting
    for the other ranks to arrive).

    Examples
    --------
    >>> import threading
    >>> import numpy as np
    >>> from cbn.distributed import ThreadCommunicator, all_reduce, communication_time
    >>> comms = ThreadCommunicator.create(2)
    >>> communication_time(comms[0])
    0.0
    >>> def rank(r):
    ...     all_reduce([np.ones(3)], comms[r])
    >>> threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> communication_time(comms[0]) > 0 and communication_time(comms[1]) > 0
    True
    """
    return _channel(comm).seconds


def _header(op: int, call: int, *, status: int = 0, c: int = 0, dtype: int = 0,
            eps: float = 0.0, aux: float = 0.0, key: int = 0, length: int = 0,
            count: int = 0, shape: Sequence[int] = ()) -> np.ndarray:
    h = np.zeros(_H, dtype=np.float64)
    h[_F_MAGIC] = _MAGIC
    h[_F_OP] = op
    h[_F_CALL] = call
    h[_F_STATUS] = status
    h[_F_C] = c
    h[_F_DTYPE] = dtype
    h[_F_EPS] = eps
    h[_F_AUX] = aux
    h[_F_KEY] = key
    h[_F_LEN] = length
    h[_F_COUNT] = count
    h[_F_NDIM] = len(shape)
    h[_F_SHAPE:_F_SHAPE + len(shape)] = shape
    return h


def _shape_of(h: np.ndarray) -> Tuple[int, ...]:
    return tuple(int(v) for v in h[_F_SHAPE:_F_SHAPE + int(h[_F_NDIM])])


def _fmt(field: int, v: float) -> str:
    if field == _F_OP:
        return _OP_NAMES.get(int(v), f"op {v:g}")
    if field == _F_DTYPE:
        return _DTYPE_NAMES.get(int(v), f"{v:g}")
    if field in (_F_EPS, _F_AUX):
        return repr(float(v))
    return f"{int(v)}" if float(v).is_integer() else repr(float(v))


def _exchange(ch: _Channel, op: int, payload: np.ndarray, **fields: Any
              ) -> Tuple[np.ndarray, np.ndarray]:
    """One cbn exchange: every rank's header and payload, after checking the headers.

    Returns ``(headers, payloads)`` of shapes ``(size, _H)`` and ``(size, len(payload))``.
    Raises :class:`CollectiveError` (the same on every rank) when a rank failed locally or
    the ranks' calls disagree.
    """
    payload = np.ascontiguousarray(payload, dtype=np.float64).reshape(-1)
    L = payload.size
    ch.calls += 1
    buf = np.zeros(_H + FIRST_BLOCK, dtype=np.float64)
    buf[:_H] = _header(op, ch.calls, length=L, **fields)
    first = min(L, FIRST_BLOCK)
    buf[_H:_H + first] = payload[:first]
    rows = ch.allgather(buf)
    heads = rows[:, :_H]
    what = _OP_NAMES[op]
    alien = [r for r in range(ch.size) if heads[r, _F_MAGIC] != _MAGIC]
    if alien:
        raise CollectiveError(f"{what}: rank(s) {alien} sent data that is not a cbn exchange "
                              "(their calls are out of step with this rank's, or the "
                              "communicator carries other traffic)")
    failed = [r for r in range(ch.size) if heads[r, _F_STATUS] != 0]
    if failed:
        raise CollectiveError(f"{what}: rank(s) {failed} raised an error before the exchange "
                              "(see their output); this call changed nothing here")
    diffs = []
    for f, name in _AGREE:
        col = heads[:, f]
        if not np.all(col == col[0]):
            diffs.append(f"{name}: " + ", ".join(f"rank {r} {_fmt(f, v)}"
                                                  for r, v in enumerate(col)))
    if diffs:
        raise CollectiveError(f"{what}: the ranks' calls disagree (every rank must make the "
                              "same cbn calls, in the same order, on modules with the same "
                              "settings): " + "; ".join(diffs))
    if L <= FIRST_BLOCK:
        return heads, rows[:, _H:_H + L]
    rest = ch.allgather(payload[FIRST_BLOCK:])
    return heads, np.concatenate([rows[:, _H:], rest], axis=1)


def _send_failure(ch: _Channel, op: int) -> None:
    """Take part in an exchange as a rank whose local work failed (the others raise)."""
    ch.calls += 1
    buf = np.zeros(_H + FIRST_BLOCK, dtype=np.float64)
    buf[:_H] = _header(op, ch.calls, status=1)
    try:
        ch.allgather(buf)
    except Exception:  # noqa: BLE001 -- the local error is the one to report
        pass


def _rank_sum(rows: np.ndarray, use: Sequence[bool]) -> np.ndarray:
    """Sum of the rows whose ``use`` is true, in rank order (a copy of the row when only
    one is used; zeros when none)."""
    total: Optional[np.ndarray] = None
    for r in range(rows.shape[0]):
        if use[r]:
            total = rows[r].copy() if total is None else total + rows[r]
    return np.zeros(rows.shape[1]) if total is None else total


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
            nbt = None
            momentum = self.momentum
            if self.track_running_stats and self.num_batches_tracked is not None:
                nbt = self.num_batches_tracked + 1
                factor = 1.0 / nbt if momentum is None else momentum
            else:
                factor = 0.0 if momentum is None else momentum
            if x.size:
                mom = _stages.moments(x, axis=axis)
            else:
                mom = Moments(0, np.zeros(C), np.zeros(C))
        except Exception:
            _send_failure(ch, _OP_FORWARD)
            raise
        heads, pay = _exchange(ch, _OP_FORWARD, np.concatenate([mom.mean, mom.m2]),
                               c=C, dtype=_dtype_code(x.dtype), eps=self.eps, aux=factor,
                               count=mom.count, shape=x.shape)
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
        # Biased convention (unbiased=False): as in BatchNorm.forward, the unbiased update
        # goes to a scratch vector of zeros, then _stages.biased_update.
        biased = None if self.unbiased or rv is None else np.zeros_like(rv)
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

    def backward(self, grad_output: ArrayLike) -> np.ndarray:
        """Gradient of the input of the last :meth:`forward` (see :meth:`BatchNorm.backward`);
        collective after a synchronized training forward. ``grad_weight``/``grad_bias``
        accumulate this rank's contributions only.

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
            return super().backward(grad_output)
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
                                   shape=x.shape)
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
        if self.weight is not None:
            if save_invstd is None:
                gw = np.zeros(C, dtype=dtype)
            else:
                gw = (sum_dy_xmu * save_invstd.astype(np.float64)).astype(dtype)
            if self.grad_weight is None:
                self.grad_weight = gw
            else:
                self.grad_weight += gw
        if self.bias is not None:
            gb = sum_dy.astype(dtype)
            if self.grad_bias is None:
                self.grad_bias = gb
            else:
                self.grad_bias += gb
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


# ----------------------------------------------------------------------------- PreciseBN


class precise_statistics:
    """Context manager: set the running statistics to the exact population statistics.

    ::

        with cbn.precise_statistics([bn1, bn2]):
            for x in batches:
                model.forward(x)          # training mode

    Inside the block, every successful training-mode call of each module also adds the
    input's (count, mean, M2) in float64 to that module's accumulator (Chan's merge, so
    batches of any size combine exactly). At the end of the block the accumulators are
    merged over the ranks (in rank order: every rank gets the same result) and each
    module's ``running_mean`` and ``running_var`` (unbiased, or biased for a module with
    ``unbiased=False``) are set to the statistics of all values seen, on every rank;
    modules that saw no training call keep theirs. ``num_batches_tracked`` counts the calls
    as usual; the running-statistic updates made by the calls themselves are overwritten.
    Eval-mode calls are not counted.

    ``comm``: the communicator to merge over. None: the communicator of the SyncBatchNorm
    modules among ``modules`` (they must share one), or, when there are none, no
    communication (this process's statistics). The exit is collective when there is a
    communicator of more than one rank. If the block raises, the population statistics are
    not written (the running statistics stay as the calls left them), and a rank whose
    block raised tells the others, which raise :class:`CollectiveError` at their exit.

    The instance (``as stats``) has ``moments``, the merged :class:`~cbn._stages.Moments`
    of each module, after the block. The modules' ``forward`` is wrapped (an instance
    attribute) inside the block and restored afterwards, whatever happens.

    Examples
    --------
    >>> import numpy as np
    >>> import cbn
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.normal(3.0, 2.0, (n, 4)).astype(np.float32) for n in (5, 17, 9)]
    >>> bn = cbn.BatchNorm1d(4)
    >>> with cbn.precise_statistics([bn]) as stats:
    ...     for b in batches:
    ...         _ = bn(b)
    >>> allx = np.concatenate(batches).astype(np.float64)
    >>> np.allclose(bn.running_mean, allx.mean(axis=0)), stats.moments[0].count
    (True, 31)
    >>> np.allclose(bn.running_var, allx.var(axis=0, ddof=1))
    True
    """

    def __init__(self, modules: Any, comm: Any = None) -> None:
        mods = _modules(modules, "precise_statistics")
        for i, m in enumerate(mods):
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"precise_statistics: modules[{i}] has no running "
                                 "statistics (track_running_stats=False)")
        self._mods = mods
        self._comm = _common_comm(mods, comm, "precise_statistics")
        self._acc: List[Moments] = []
        self._saved: List[Tuple[bool, Any]] = []
        self.moments: Optional[List[Moments]] = None

    def __enter__(self) -> "precise_statistics":
        if self._saved:
            raise RuntimeError("precise_statistics is not reentrant")
        for m in self._mods:
            if getattr(m.forward, "_cbn_precise", False):
                raise ValueError("precise_statistics: a module is already inside another "
                                 "precise_statistics block")
        self._acc = [Moments(0, np.zeros(m.num_features), np.zeros(m.num_features))
                     for m in self._mods]
        self._saved = []
        try:
            for i, m in enumerate(self._mods):
                had = "forward" in vars(m)
                self._saved.append((had, vars(m).get("forward")))
                m.forward = self._wrap(m, i)
        except BaseException:
            self._restore()
            raise
        return self

    def _wrap(self, module: BatchNorm, i: int):
        inner = module.forward

        def forward(input: ArrayLike) -> np.ndarray:
            y = inner(input)
            if module.training:
                x = input if isinstance(input, np.ndarray) else np.asarray(input)
                if x.size:
                    mom = _stages.moments(x, axis=module.axis % x.ndim)
                    self._acc[i] = _stages.merge_moments([self._acc[i], mom])
            return y

        forward._cbn_precise = True  # type: ignore[attr-defined]
        forward.__doc__ = inner.__doc__
        return forward

    def _restore(self) -> None:
        for m, (had, old) in zip(self._mods, self._saved):
            if had:
                m.forward = old
            else:
                vars(m).pop("forward", None)
        self._saved = []

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()
        ch = None
        if self._comm is not None:
            ch = _channel(self._comm)
            if ch.size == 1:
                ch = None
        if exc_type is not None:
            # Tell the others, unless this is a CollectiveError: then they know already
            # (they raised it in the same exchange, or this rank raised it because another
            # rank's failure reached it there).
            if ch is not None and not issubclass(exc_type, CollectiveError):
                _send_failure(ch, _OP_PRECISE)
            return None
        merged = list(self._acc)
        if ch is not None:
            Cs = [m.num_features for m in self._mods]
            payload = np.concatenate([np.concatenate([[float(a.count)], a.mean, a.m2])
                                      for a in self._acc]) if self._acc else np.zeros(0)
            _, pay = _exchange(ch, _OP_PRECISE, payload, c=sum(Cs), aux=len(Cs),
                               key=zlib.crc32(repr(Cs).encode()))
            merged, off = [], 0
            for C in Cs:
                parts = [Moments(int(pay[r, off]), pay[r, off + 1:off + 1 + C],
                                 pay[r, off + 1 + C:off + 1 + 2 * C]) for r in range(ch.size)]
                merged.append(_stages.merge_moments(parts))
                off += 1 + 2 * C
        for i, (m, mom) in enumerate(zip(self._mods, merged)):
            if mom.count == 1 and m.unbiased:
                raise ValueError(f"precise_statistics: modules[{i}] saw 1 value per channel; "
                                 "the unbiased variance needs more")
        for m, mom in zip(self._mods, merged):
            if mom.count == 0:
                continue
            m.running_mean[...] = mom.mean.astype(m.dtype)
            n = mom.count - 1 if m.unbiased else mom.count
            m.running_var[...] = (mom.m2 / n).astype(m.dtype)
            if m.frozen:
                m.freeze()
        self.moments = merged
        return None


# ------------------------------------------------------------------------------ overhead


def measure_overhead(shape: Sequence[int] = (32, 64, 28, 28), comm: Any = None, *,
                     dtype: DTypeLike = np.float32, repeat: int = 30,
                     warmup: int = 3) -> Dict[str, float]:
    """Time a training forward + backward of SyncBatchNorm and of BatchNorm on this rank's
    ``shape`` input (collective: run it on every rank). Returns medians in seconds:
    ``{"batchnorm": t_bn, "sync": t_sync, "ratio": t_sync / t_bn, "comm": time in the
    collectives per step}``. Timings on a shared machine are noisy: quote them as rough.

    Examples
    --------
    >>> from cbn.distributed import ThreadCommunicator, measure_overhead
    >>> r = measure_overhead((8, 4, 5), ThreadCommunicator.create(1)[0], repeat=3)
    >>> sorted(r)
    ['batchnorm', 'comm', 'ratio', 'sync']
    >>> r["comm"]                     # a single rank does not communicate
    0.0

    On every rank of an MPI job (``benchmarks/sync_overhead.py`` does this):

    >>> r = measure_overhead((32, 64, 28, 28))                  # doctest: +SKIP
    """
    ch = _channel(comm)
    rng = np.random.default_rng(ch.rank)
    x = rng.standard_normal(tuple(shape)).astype(dtype)
    g = rng.standard_normal(tuple(shape)).astype(dtype)
    C = x.shape[1]
    bn = BatchNorm(C, dtype=dtype)
    sbn = SyncBatchNorm(C, dtype=dtype, comm=ch.comm)

    def med(module) -> Tuple[float, float]:
        ts, cs = [], []
        for i in range(warmup + repeat):
            c0 = ch.seconds
            t0 = time.perf_counter()
            module.forward(x)
            module.backward(g)
            t = time.perf_counter() - t0
            if i >= warmup:
                ts.append(t)
                cs.append(ch.seconds - c0)
        return float(np.median(ts)), float(np.median(cs))

    t_bn, _ = med(bn)
    t_sync, t_comm = med(sbn)
    return {"batchnorm": t_bn, "sync": t_sync, "ratio": t_sync / t_bn, "comm": t_comm}


def _overhead_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cbn.distributed`` under mpiexec: SyncBatchNorm's overhead over BatchNorm
    on every rank (measure_overhead); rank 0 prints the medians. ``python -m cbn bench
    --sync-ranks 2,4`` launches it."""
    import argparse
    p = argparse.ArgumentParser(
        prog="mpiexec -n N python -m cbn.distributed",
        description="SyncBatchNorm's overhead over BatchNorm: a training forward + backward "
                    "on every rank, each on its own batch of --shape.")
    p.add_argument("--shape", default="32x64x28x28", help="this rank's batch, NCHW "
                   "(default 32x64x28x28)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=30, help="timed steps (default 30)")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    comm = as_communicator(None)
    r = measure_overhead(shape, comm, dtype=np.dtype(args.dtype), repeat=args.repeat)
    rows = comm.allgather(np.array([r["batchnorm"], r["sync"], r["comm"]]))
    if comm.rank == 0:
        print(f"{comm.size} ranks, {args.shape} {args.dtype} per rank, training forward + "
              f"backward, medians of {args.repeat}")
        print("rank  BatchNorm us  SyncBatchNorm us  ratio  in collectives us")
        for i, (bn, sync, c) in enumerate(rows):
            print(f"{i:4d}  {bn * 1e6:12.1f}  {sync * 1e6:16.1f}  {sync / bn:5.2f}  "
                  f"{c * 1e6:17.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_overhead_main())
