"""Communicators: the protocol cbn needs, the adapters for mpi4py, torch.distributed and
threads of one process, and :func:`as_communicator`, which picks one for any ``comm``.
(Part of :mod:`cbn.distributed`; import the names from there.)"""

from __future__ import annotations

import numbers
import operator
import sys
import threading
import time
import weakref
from typing import (Any, Callable, Dict, List, Optional, Protocol, Tuple,
                    runtime_checkable)

import numpy as np

__all__ = ["Communicator", "CollectiveError", "MPICommunicator", "TorchCommunicator",
           "ThreadCommunicator", "as_communicator"]


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


CollectiveError.__module__ = "cbn.distributed"     # its public home, as tracebacks show it


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


#: seconds an MPI rank waits in one of cbn's collectives for the others (as
#: torch.distributed's default): see :class:`MPICommunicator`
MPI_TIMEOUT = 1800.0


def _check_timeout(timeout: Any, *, allow_none: bool) -> Optional[float]:
    """A collective's timeout in seconds: a finite number > 0 (or None where allowed)."""
    if timeout is None and allow_none:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds{' or None' if allow_none else ''}"
                        f", got {type(timeout).__name__}")
    t = float(timeout)
    if not (0 < t < 1e9):
        raise ValueError(f"timeout must be a finite number of seconds > 0 (below 1e9), got "
                         f"{timeout!r}")
    return t


class MPICommunicator:
    """An mpi4py communicator (or anything with ``Allgather``, ``Get_rank``, ``Get_size``)
    as a :class:`Communicator`: one ``Allgather`` of float64 buffers per exchange.

    ``timeout`` (seconds, default :data:`MPI_TIMEOUT` = 1800): a rank waits no longer than
    this in a collective for the others (one in eval mode while the others train, one that
    caught its own error and skipped a call). The collective is started non-blocking
    (``Iallgather``) and polled against the deadline; past it, :class:`CollectiveError` is
    raised and the communicator is unusable for cbn from then on (MPI cannot cancel a
    collective): end the job, e.g. with ``comm.Abort()``, or let the error end it under
    ``python -m mpi4py``. ``timeout=None`` waits forever (a blocking ``Allgather``), as do
    duck-typed communicators without ``Iallgather``. :func:`as_communicator` uses the
    default; pass ``MPICommunicator(comm, timeout=...)`` as ``comm`` for another.

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
    >>> MPICommunicator(One(), timeout=float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: timeout must be a finite number of seconds > 0 (below 1e9), got inf
    """

    def __init__(self, comm: Any, *, timeout: Optional[float] = MPI_TIMEOUT) -> None:
        for name in ("Allgather", "Get_rank", "Get_size"):
            if not callable(getattr(comm, name, None)):
                raise TypeError(f"comm must be an mpi4py communicator (with Allgather, "
                                f"Get_rank and Get_size), got {type(comm).__name__}")
        self.timeout: Optional[float] = _check_timeout(timeout, allow_none=True)
        self.comm = comm
        self.rank: int = int(comm.Get_rank())
        self.size: int = int(comm.Get_size())
        # a collective abandoned at its deadline: (send, recv, request), kept alive because
        # MPI still owns the buffers
        self._abandoned: Optional[Tuple[Any, Any, Any]] = None

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
        if self._abandoned is not None:
            raise CollectiveError("MPICommunicator: an earlier collective on this "
                                  "communicator timed out; it cannot be used again")
        buf = np.ascontiguousarray(buf, dtype=np.float64)
        out = np.empty((self.size, buf.size), dtype=np.float64)
        start = getattr(self.comm, "Iallgather", None)
        if self.timeout is None or not callable(start):
            self.comm.Allgather(buf, out)
            return out
        req = start(buf, out)
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        pause = 0.0
        while not req.Test():
            now = time.monotonic()
            if now >= deadline:
                self._abandoned = (buf, out, req)
                raise CollectiveError(
                    f"MPICommunicator: rank {self.rank} waited {self.timeout:g} s in a "
                    "collective that the other ranks did not join (a rank in another mode, "
                    "one that skipped a call or failed); this communicator cannot be used "
                    "by cbn again: end the job (comm.Abort())")
            if now - t0 > 1e-4:            # poll freely for 0.1 ms, then sleep up to 1 ms
                time.sleep(pause)
                pause = min(2 * pause or 1e-5, 1e-3)
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
        >>> ThreadCommunicator.create(2, timeout=0)
        Traceback (most recent call last):
        ...
        ValueError: timeout must be a finite number of seconds > 0 (below 1e9), got 0
        """
        size = _positive_int(size, "size")
        group = _ThreadGroup(size, _check_timeout(timeout, allow_none=False))
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


_LOCK = threading.Lock()
#: id(raw communicator) -> (reference to it, weak reference to its adapter): an entry goes
#: with its communicator (objects without weak references are kept, as they must be).
_ADAPTERS: Dict[int, Tuple[Callable[[], Any], Callable[[], Any]]] = {}


def _ref(obj: Any, table: Optional[Dict[int, Any]] = None) -> Callable[[], Any]:
    """A weak reference to ``obj`` that deletes ``table[id(obj)]`` when ``obj`` dies; a
    strong one (a function returning it) for objects without weak references."""
    key = id(obj)

    def gone(ref: Any) -> None:
        entry = table.get(key) if table is not None else None
        if entry is not None and entry[0] is ref:
            table.pop(key, None)            # (no lock: the GC may call this anywhere)
    try:
        return weakref.ref(obj, gone if table is not None else None)
    except TypeError:
        return lambda: obj


def _key_of(adapter: Any) -> Any:
    """The object whose lifetime bounds an adapter's bookkeeping (call counter, time): the
    mpi4py communicator or process group it wraps, else the adapter itself."""
    if isinstance(adapter, MPICommunicator):
        return adapter.comm
    if isinstance(adapter, TorchCommunicator) and adapter.group is not None:
        return adapter.group
    return adapter


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
    hit = _ADAPTERS.get(id(comm))
    if hit is not None and hit[0]() is comm:
        known = hit[1]()
        if known is not None:
            return known
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
    if adapter is not comm:
        with _LOCK:
            _ADAPTERS[id(comm)] = (_ref(comm, _ADAPTERS), _ref(adapter))
    return adapter
