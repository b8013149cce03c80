"""Thread-count resolution for cbn's kernels.

At each call the count is, in order of precedence: the ``n_threads`` argument, the value
given to :func:`set_num_threads`, then ``omp_get_max_threads()`` of the OpenMP runtime the
kernels are linked to (which follows ``OMP_NUM_THREADS`` and threadpoolctl's limits).
Inputs too small to pay for a thread team run on one thread whatever is asked.
"""

from __future__ import annotations

import operator

from . import _kernels

__all__ = ["get_num_threads", "set_num_threads", "resolve_num_threads"]

#: Below this many values per array, kernels run on one thread: waking a team of threads
#: costs a few microseconds, more than a second core saves on so little data.
MIN_PARALLEL_SIZE = 1 << 16

_override: int | None = None


def _check_count(n, name):
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def set_num_threads(n: int | None) -> None:
    """Set the number of threads cbn's kernels use; ``None`` restores the default
    (``omp_get_max_threads()``, i.e. OMP_NUM_THREADS or threadpoolctl's limit).

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


def get_num_threads() -> int:
    """The number of threads a large enough call would use now.

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
    return _override if _override is not None else _kernels.max_threads()


def resolve_num_threads(n_threads: int | None, size: int) -> int:
    """Threads for one call on an array of ``size`` values (validated).

    Examples
    --------
    >>> from cbn._threads import MIN_PARALLEL_SIZE, resolve_num_threads
    >>> resolve_num_threads(4, MIN_PARALLEL_SIZE), resolve_num_threads(4, 100)
    (4, 1)
    """
    n = get_num_threads() if n_threads is None else _check_count(n_threads, "n_threads")
    return 1 if size < MIN_PARALLEL_SIZE else n
