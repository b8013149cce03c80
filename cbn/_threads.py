"""Thread policy for cbn's kernels: the one place where a call's thread count is decided.

At each call the count is, in order of precedence: the ``n_threads`` argument, the value
given to :func:`set_num_threads`, then ``omp_get_max_threads()`` of the OpenMP runtime the
kernels are linked to (which follows ``OMP_NUM_THREADS`` and threadpoolctl's limits). Then:

- counts above :data:`MAX_THREADS` are clipped to it (a team of thousands of threads only
  exhausts memory or the address space, and libgomp then ends the process);
- in a process forked after this one ran a kernel on more than one thread, every call runs
  on one thread: libgomp's thread pool does not survive ``fork()``, and a child that enters a
  parallel region waits forever for the parent's workers. A kernel on one thread never enters
  an OpenMP region, so such a child computes the same bits, serially. Processes started with
  ``spawn`` or ``forkserver`` (a fresh interpreter, or forked from one that never ran a
  parallel region) are not affected;
- before every ``os.fork()`` (and so every ``multiprocessing`` "fork" child), the forking
  thread's libgomp pool is released with ``omp_pause_resource_all`` in every libgomp loaded
  in the process, whoever created it (PyTorch, NumPy's BLAS, any library linked to libgomp):
  the child then starts a fresh pool instead of waiting for the parent's workers. Where
  that is not possible (a libgomp older than OpenMP 5.0, or the fork happens inside a
  parallel region), a child of a process that holds threads besides its Python threads
  runs every call on one thread, as above. (A ``fork()`` made from C, not through Python's
  ``os.fork``, runs no Python hook: call :func:`cbn._threads.before_fork` first there.)
- inputs too small to pay for a thread team (under :data:`MIN_PARALLEL_SIZE` values) run on
  one thread whatever is asked.
"""

from __future__ import annotations

import ctypes
import operator
import os
import threading
import warnings

import numpy as np

from . import _kernels

# (the constants MAX_THREADS and MIN_PARALLEL_SIZE are read as cbn._threads.NAME)
__all__ = ["get_num_threads", "requested_num_threads", "resolve_num_threads", "call_threads",
           "set_num_threads"]

#: Below this many values per array, kernels run on one thread: waking a team of threads
#: costs a few microseconds, more than a second core saves on so little data.
MIN_PARALLEL_SIZE = 1 << 16


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):              # not Linux
        return os.cpu_count() or 1


#: The most threads one call uses: 4 per CPU this process may run on, and at least 16.
#: Larger requests (``n_threads``, :func:`set_num_threads`, ``OMP_NUM_THREADS``) are clipped
#: to it; results do not depend on the count.
MAX_THREADS = max(16, 4 * _usable_cpus())

_override: int | None = None        # set_num_threads' value, clipped; None: not set
_ran_parallel = False               # this process ran a kernel on a team of threads
_forked = False                     # a child forked after that: one thread from now on
_pause_failed = False               # the last before_fork could not release every pool

#: omp_pause_hard (OpenMP 5.0): release the thread pool and its threads
_OMP_PAUSE_HARD = 2
_GOMP: dict = {}                    # path of a loaded libgomp -> its omp_pause_resource_all


def _loaded_libgomps() -> list:
    """``omp_pause_resource_all`` of every libgomp mapped in this process (None for one
    that lacks it), found in /proc/self/maps: PyTorch's bundled copy, the system's, ..."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if "libgomp" in line}
    except OSError:                                # not Linux: LLVM's libomp handles fork
        return []
    found = []
    for path in sorted(p for p in paths if os.path.basename(p).startswith("libgomp")):
        if path not in _GOMP:
            try:
                fn = ctypes.CDLL(path).omp_pause_resource_all
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                fn = None
            _GOMP[path] = fn
        found.append(_GOMP[path])
    return found


def _foreign_threads() -> bool:
    """Whether this process holds OS threads that are not Python threads (a thread pool of
    some library, perhaps libgomp's)."""
    try:
        n = len(os.listdir("/proc/self/task"))
    except OSError:
        return True
    return n > threading.active_count()


def before_fork() -> None:
    """Release the calling thread's OpenMP pool in every libgomp of the process, so that a
    child forked next can run parallel regions (libgomp's workers do not survive fork).
    Registered with ``os.register_at_fork``; call it yourself before a ``fork()`` made from
    C. Costs the parent nothing but the pool's restart at its next parallel region.

    Examples
    --------
    >>> from cbn._threads import before_fork
    >>> before_fork()
    """
    global _pause_failed
    failed = False
    for fn in _loaded_libgomps():
        # -1: the calling thread is inside a parallel region (its pool is in use)
        if fn is None or fn(_OMP_PAUSE_HARD) != 0:
            failed = True
    _pause_failed = failed and _foreign_threads()


def _after_fork_in_child() -> None:
    global _forked
    if _ran_parallel or _pause_failed:
        _forked = True


if hasattr(os, "register_at_fork"):                 # POSIX
    os.register_at_fork(before=before_fork, after_in_child=_after_fork_in_child)


def _check_count(n, name: str) -> int:
    """A thread count: an int (not bool) >= 1, clipped to MAX_THREADS."""
    if isinstance(n, bool):
        raise TypeError(f"{name} must be an int or None, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return min(n, MAX_THREADS)


def set_num_threads(n: int | None) -> None:
    """Set the number of threads cbn's kernels use; ``None`` restores the default
    (``omp_get_max_threads()``, i.e. OMP_NUM_THREADS or threadpoolctl's limit). Counts above
    ``cbn._threads.MAX_THREADS`` are clipped to it.

    A ``n_threads`` argument given to a call takes precedence. Results are bit-identical
    for any thread count. Raises TypeError if ``n`` is not an int or None, ValueError if it
    is below 1.

    Examples
    --------
    >>> import cbn
    >>> cbn.set_num_threads(2)
    >>> cbn.get_num_threads()
    2
    >>> cbn.set_num_threads(None)                # back to the OpenMP runtime's default
    >>> cbn.set_num_threads(0)
    Traceback (most recent call last):
        ...
    ValueError: n must be >= 1, got 0
    """
    global _override
    _override = None if n is None else _check_count(n, "n")


def requested_num_threads() -> int | None:
    """The count set by :func:`set_num_threads` (clipped), or None when none is set.

    Examples
    --------
    >>> import cbn
    >>> from cbn._threads import requested_num_threads
    >>> cbn.set_num_threads(2)
    >>> requested_num_threads()
    2
    >>> cbn.set_num_threads(None)
    >>> requested_num_threads() is None
    True
    """
    return _override


def get_num_threads() -> int:
    """The number of threads a large enough call would use now: 1 in a process forked
    after its parent ran a kernel on several threads (see the module's docstring).

    Examples
    --------
    >>> import cbn
    >>> cbn.get_num_threads() >= 1
    True
    >>> cbn.set_num_threads(3)
    >>> cbn.get_num_threads()
    3
    >>> cbn.set_num_threads(None)
    """
    if _forked:
        return 1
    n = _override if _override is not None else _kernels.max_threads()
    return n if n <= MAX_THREADS else MAX_THREADS


def resolve_num_threads(n_threads: int | None, size: int) -> int:
    """Threads for one call on an array of ``size`` values (``n_threads`` validated).

    Examples
    --------
    >>> from cbn._threads import MIN_PARALLEL_SIZE, resolve_num_threads
    >>> resolve_num_threads(4, MIN_PARALLEL_SIZE), resolve_num_threads(4, 100)
    (4, 1)
    """
    global _ran_parallel
    n = get_num_threads() if n_threads is None else _check_count(n_threads, "n_threads")
    if size < MIN_PARALLEL_SIZE or _forked:
        return 1
    if n > 1:
        _ran_parallel = True
    return n


def call_threads(n_threads, x):
    """The fast path's thread count for input ``x``, before the small-input rule (which the
    kernels apply with :data:`MIN_PARALLEL_SIZE`): as :func:`resolve_num_threads` for None
    or an int >= 1; anything else is returned unchanged, so that the fast path declines the
    call and the general path validates it. (Called on every small call: kept lean.)

    Examples
    --------
    >>> import numpy as np
    >>> from cbn._threads import MAX_THREADS, call_threads
    >>> x = np.zeros((4, 3), np.float32)
    >>> call_threads(2, x), call_threads(10**9, x) == MAX_THREADS, call_threads("2", x)
    (2, True, '2')
    """
    global _ran_parallel
    if n_threads is None:
        n = _override if _override is not None else _kernels.max_threads()
    elif type(n_threads) is int and n_threads >= 1:
        n = n_threads
    else:
        return n_threads
    if n == 1 or _forked:
        return 1
    if n > MAX_THREADS:
        n = MAX_THREADS
    if not _ran_parallel and type(x) is np.ndarray and x.size >= MIN_PARALLEL_SIZE:
        _ran_parallel = True
    return n


# The plain-call fast path (cbn/_plain.pxi) asks this module for the thread count of every
# call large enough to use threads.
_kernels._set_thread_resolver(call_threads)


def _read_adaptive_env() -> None:
    """CBN_ADAPTIVE_THREADS: 0/false/no/off turns the adaptive team off (any case), 1/true/
    yes/on or nothing keeps it on; anything else warns and keeps it on."""
    raw = os.environ.get("CBN_ADAPTIVE_THREADS")
    if raw is None:
        return
    value = raw.strip().lower()
    if value in ("0", "false", "no", "off"):
        _kernels._team_reset(False)
    elif value not in ("", "1", "true", "yes", "on"):
        warnings.warn(f"CBN_ADAPTIVE_THREADS ignored: {raw!r} is not one of 0, 1, false, "
                      "true, no, yes, off, on (the adaptive team stays on)", RuntimeWarning,
                      stacklevel=2)


_read_adaptive_env()
