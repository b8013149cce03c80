# The output pool: cbn's large fresh outputs live in blocks that a small cache hands back
# on the next call of the same size, already faulted in (cbn/src/cbn_pool.h says why).

import numpy as _np

cdef extern from "cbn_pool.h":
    """
    /* A new array (like PyArray_EMPTY) whose data comes from the output pool when it is
       large enough to be worth keeping and the pool is on; NULL with an exception set. */
    static PyObject* cbn_pool_capsule_obj = NULL;
    static PyObject* cbn_pool_empty(int nd, npy_intp* dims, int typenum, int fortran) {
        PyObject *old, *back, *arr;
        npy_intp i, n;
        PyArray_Descr* d = PyArray_DescrFromType(typenum);
        if (d == NULL) return NULL;
        n = PyDataType_ELSIZE(d);
        Py_DECREF(d);
        for (i = 0; i < nd; i++) n *= dims[i];
        if ((size_t)n < cbn_pool.min_size || cbn_pool.limit == 0)
            return PyArray_EMPTY(nd, dims, typenum, fortran);
        if (cbn_pool_capsule_obj == NULL) {
            cbn_pool_capsule_obj = PyCapsule_New(&cbn_pool_handler, "mem_handler", NULL);
            if (cbn_pool_capsule_obj == NULL) return NULL;
        }
        old = PyDataMem_SetHandler(cbn_pool_capsule_obj);
        if (old == NULL) return NULL;
        arr = PyArray_EMPTY(nd, dims, typenum, fortran);
        back = PyDataMem_SetHandler(old);
        Py_DECREF(old);
        if (back == NULL) { Py_XDECREF(arr); return NULL; }
        Py_DECREF(back);
        return arr;
    }
    static size_t cbn_pool_bytes(void) { return cbn_pool.bytes; }
    static size_t cbn_pool_get_limit(void) { return cbn_pool.limit; }
    static unsigned long long cbn_pool_hits(void) { return cbn_pool.hits; }
    static unsigned long long cbn_pool_misses(void) { return cbn_pool.misses; }
    static size_t cbn_pool_min_size(void) { return cbn_pool.min_size; }
    """
    object cbn_pool_empty(int nd, cnp.npy_intp* dims, int typenum, int fortran)
    void cbn_pool_set_limit(size_t limit) nogil
    int cbn_pool_init() nogil
    size_t cbn_pool_bytes() nogil
    size_t cbn_pool_get_limit() nogil
    unsigned long long cbn_pool_hits() nogil
    unsigned long long cbn_pool_misses() nogil
    size_t cbn_pool_min_size() nogil


cdef inline object pool_empty(int nd, cnp.npy_intp* dims, int typenum):
    """A new C-ordered array (the data from the output pool when it is large)."""
    return cbn_pool_empty(nd, dims, typenum, 0)


def empty(shape, dtype):
    """``numpy.empty(shape, dtype)`` (C order), the data from the output pool when it is
    large: what cbn allocates its outputs with."""
    cdef cnp.dtype d = _np.dtype(dtype)
    cdef int nd = len(shape), i
    cdef cnp.npy_intp dims[32]
    if nd > 32:
        return _np.empty(shape, d)
    for i in range(nd):
        dims[i] = shape[i]
    return cbn_pool_empty(nd, dims, d.type_num, 0)


def output_pool(max_bytes=None):
    """The pool that cbn's large outputs are allocated from: its state, and its limit.

    A fresh output of 4 MB or more (``y`` of a forward without ``out=``, ``grad_input`` of
    a backward) comes from a small cache of the blocks that earlier outputs were freed to,
    so that a loop over the same shapes writes into memory that is already mapped: a
    fresh mapping would fault in every page on first write, which costs more than the
    normalization itself (docs/performance.md). The arrays own their memory as any NumPy
    array does; when one is freed its block goes back to the pool, which keeps at most 8
    blocks and ``max_bytes`` bytes (the oldest are released first). The environment
    variable ``CBN_OUTPUT_POOL`` sets the limit at import (bytes, with an optional K, M or
    G suffix; 0 turns the pool off); the default is 256 MB.

    Parameters
    ----------
    max_bytes : int, optional
        The new limit in bytes: every block now held is released first, and 0 turns the
        pool off. None (the default) changes nothing.

    Returns
    -------
    dict
        ``max_bytes`` (the limit), ``held_bytes`` (memory held by free blocks now),
        ``hits`` and ``misses`` (large allocations served from the pool, and from the
        system, since import), ``min_size`` (the smallest output that is pooled).

    Examples
    --------
    >>> import cbn
    >>> sorted(cbn.output_pool())
    ['held_bytes', 'hits', 'max_bytes', 'min_size', 'misses']
    """
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, _np.integer)):
            raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        cbn_pool_set_limit(<size_t>min(int(max_bytes), 1 << 62))
    return {"max_bytes": int(cbn_pool_get_limit()), "held_bytes": int(cbn_pool_bytes()),
            "hits": int(cbn_pool_hits()), "misses": int(cbn_pool_misses()),
            "min_size": int(cbn_pool_min_size())}


def _pool_limit_from_env(value):
    """CBN_OUTPUT_POOL's value as bytes ("0", "512M", "1G", "1048576"), or None (with a
    warning naming it) when it is not one."""
    v = value.strip().upper()
    n = len(v)
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(v[n - 1:] if n else "", 1)
    digits = v[:n - 1] if scale != 1 else v
    if not digits.isdigit():
        import warnings
        warnings.warn(f"CBN_OUTPUT_POOL={value!r} is not a size in bytes (such as 0, "
                      "512M, 1G): the output pool keeps its default limit", RuntimeWarning,
                      stacklevel=2)
        return None
    return int(digits) * scale


cbn_pool_init()
import os as _pool_os
if _pool_os.environ.get("CBN_OUTPUT_POOL") is not None:
    _limit = _pool_limit_from_env(_pool_os.environ["CBN_OUTPUT_POOL"])
    if _limit is not None:
        output_pool(_limit)
del _pool_os
