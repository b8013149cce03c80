"""The exchange protocol: every collective cbn makes starts with a fixed-size block (a
header and up to ``FIRST_BLOCK`` payload values), so that ranks whose calls disagree see it
in the headers and all raise :class:`~cbn.distributed.CollectiveError`; and the per
communicator bookkeeping (call counter, time spent). (Part of :mod:`cbn.distributed`.)"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ._adapters import _LOCK, CollectiveError, Communicator, _key_of, _ref, as_communicator

__all__ = ["communication_time"]

# ------------------------------------------------------------------------------ exchange

#: payload values carried by the first, fixed-size collective of every exchange
FIRST_BLOCK = 512

_MAGIC = float(0x63626E5E17)          # marks a cbn header (exactly representable)
# header fields (float64 each)
_F_MAGIC, _F_OP, _F_CALL, _F_STATUS, _F_C, _F_DTYPE, _F_EPS, _F_AUX, _F_KEY, _F_LEN, \
    _F_COUNT, _F_NDIM = range(12)
_F_SHAPE = 12                          # 5 slots
_F_FLAGS = _F_SHAPE + 5                # settings that change the result (see _fmt)
_H = _F_FLAGS + 1
#: fields every rank must agree on, and how messages name them
_AGREE = ((_F_OP, "operation"), (_F_CALL, "collective call number"), (_F_C, "channels"),
          (_F_DTYPE, "input dtype"), (_F_EPS, "eps"), (_F_AUX, "momentum factor / count"),
          (_F_KEY, "layout key"), (_F_LEN, "payload length"),
          (_F_FLAGS, "settings"))

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


class _State:
    """The bookkeeping of one communicator: collective calls made, seconds spent."""

    __slots__ = ("calls", "seconds", "__weakref__")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0


#: id(key) -> (reference to the key, its _State); see _adapters._key_of. An entry goes with
#: its communicator, so programs that make many communicators do not grow.
_STATES: Dict[int, Tuple[Callable[[], Any], _State]] = {}


def _state_of(key: Any) -> _State:
    hit = _STATES.get(id(key))
    if hit is not None and hit[0]() is key:
        return hit[1]
    with _LOCK:
        hit = _STATES.get(id(key))
        if hit is not None and hit[0]() is key:
            return hit[1]
        state = _State()
        _STATES[id(key)] = (_ref(key, _STATES), state)
        return state


class _Channel:
    """A communicator with cbn's bookkeeping: the call counter and the time spent (shared
    by every channel of the same communicator)."""

    def __init__(self, comm: Communicator, state: _State) -> None:
        self.comm = comm
        self.rank = int(comm.rank)
        self.size = int(comm.size)
        self._state = state

    @property
    def calls(self) -> int:
        return self._state.calls

    @calls.setter
    def calls(self, n: int) -> None:
        self._state.calls = n

    @property
    def seconds(self) -> float:
        return self._state.seconds

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            res = self.comm.allgather(buf)
        finally:
            self._state.seconds += time.perf_counter() - t0
        rows = np.asarray(res if isinstance(res, np.ndarray) else np.stack(
            [np.asarray(r, dtype=np.float64).reshape(-1) for r in res]), dtype=np.float64)
        if rows.shape != (self.size, buf.size):
            raise CollectiveError(f"{type(self.comm).__name__}.allgather returned shape "
                                  f"{rows.shape}, expected {(self.size, buf.size)}")
        return rows


def _channel(comm: Any) -> _Channel:
    adapter = as_communicator(comm)
    return _Channel(adapter, _state_of(_key_of(adapter)))


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
            count: int = 0, shape: Sequence[int] = (), flags: int = 0) -> np.ndarray:
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
    h[_F_FLAGS] = flags
    return h


def _shape_of(h: np.ndarray) -> Tuple[int, ...]:
    return tuple(int(v) for v in h[_F_SHAPE:_F_SHAPE + int(h[_F_NDIM])])


def _fmt(field: int, v: float) -> str:
    if field == _F_OP:
        return _OP_NAMES.get(int(v), f"op {v:g}")
    if field == _F_DTYPE:
        return _DTYPE_NAMES.get(int(v), f"{v:g}")
    if field == _F_FLAGS:
        return ("unbiased=" + str(bool(int(v) & 1)) + " track_running_stats="
                + str(bool(int(v) & 2)))
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
