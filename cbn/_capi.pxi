# Included by _kernels.pyx: the C ABI (cbn/include/cbn.h). The core's entries behind the
# checks that cbn's Python functions make, so that a caller in C, Cython, numba or ctypes
# gets the same errors (a status and the message, worded as the Python API words it)
# instead of undefined behaviour; and one table of function pointers, exported as the
# PyCapsule "cbn._kernels._C_API".

from cpython.pycapsule cimport PyCapsule_New
from libc.math cimport isfinite, NAN

cdef extern from "cbn.h" nogil:
    enum: CBN_ABI_VERSION
    ctypedef struct cbn_api:
        int32_t abi_version
        int32_t size
        const char* version
        int32_t (*view)(cbn_desc*, int32_t, const int64_t*, const int64_t*,
                        int32_t) noexcept nogil
        int32_t (*forward)(const cbn_desc*, const cbn_forward_args*) noexcept nogil
        int32_t (*normalize)(const cbn_desc*, const cbn_normalize_args*) noexcept nogil
        int32_t (*eval_params)(const cbn_desc*, const cbn_eval_params_args*) noexcept nogil
        int32_t (*backward)(const cbn_desc*, const cbn_backward_args*) noexcept nogil
        int32_t (*moments)(const cbn_desc*, const cbn_moments_args*) noexcept nogil
        int32_t (*finish)(const cbn_desc*, const cbn_finish_args*) noexcept nogil
        int32_t (*backward_reduce)(const cbn_desc*, const cbn_reduce_args*) noexcept nogil
        int32_t (*backward_elements)(const cbn_desc*,
                                     const cbn_elements_args*) noexcept nogil
        const char* (*status_name)(int32_t) noexcept nogil

cdef extern from *:
    """
    static const char* const cbn_act_names[] = {"None", "'relu'", "'relu6'", "'leaky_relu'",
                                                "'silu'", "'hardswish'"};
    /* 1 where the backward reads the forward's output, 2 where it recomputes z */
    static const int cbn_act_from[] = {0, 1, 1, 1, 2, 2};
    """
    const char* cbn_act_names[]
    const int cbn_act_from[]


# ---------------------------------------------------------------------------- checks

cdef int32_t bad(const cbn_desc* d, const char* fmt, const char* name) noexcept nogil:
    """CBN_ERR_ARG, with fmt % name as the message."""
    if d.msg != NULL and d.msg_size > 0:
        snprintf(d.msg, <size_t>d.msg_size, fmt, name)
    return CBN_ERR_ARG


cdef inline int32_t need(const cbn_desc* d, const void* p, const char* name) noexcept nogil:
    if p == NULL:
        return bad(d, "%s must not be NULL", name)
    return CBN_OK


cdef int32_t check_desc(const cbn_desc* d) noexcept nogil:
    """The descriptor's own fields (the core repeats the layout checks)."""
    if d.version != CBN_DESC_VERSION:
        return bad(d, "%sunknown descriptor version: set desc.version = CBN_DESC_VERSION",
                   "")
    if d.storage < 0 or d.storage >= CBN_NDTYPES or d.compute < 0 or d.compute >= CBN_NDTYPES:
        return bad(d, "%sunknown dtype code in the descriptor", "")
    if d.M < 0 or d.C < 0 or d.K < 0:
        return bad(d, "%sM, C and K must be >= 0", "")
    if d.nthreads < 1:
        return bad(d, "%sn_threads must be >= 1", "")
    return CBN_OK


cdef int32_t check_eps_momentum(const cbn_desc* d, double eps, double momentum) noexcept nogil:
    if not (isfinite(eps) and eps >= 0):
        if d.msg != NULL and d.msg_size > 0:
            snprintf(d.msg, <size_t>d.msg_size,
                     "eps must be a finite non-negative number, got %g", eps)
        return CBN_ERR_ARG
    if not isfinite(momentum):
        if d.msg != NULL and d.msg_size > 0:
            snprintf(d.msg, <size_t>d.msg_size, "momentum must be finite, got %g", momentum)
        return CBN_ERR_ARG
    return CBN_OK


cdef int32_t check_abi_act(const cbn_desc* d, const cbn_act* act, const void* output,
                           bint backward) noexcept nogil:
    """The activation's kind and parameter; in a backward, the array its derivative
    reads (the forward's output for relu, relu6 and leaky_relu)."""
    if act.kind < 0 or act.kind >= CBN_NACTS:
        if d.msg != NULL and d.msg_size > 0:
            snprintf(d.msg, <size_t>d.msg_size,
                     "activation must be None, 'relu', 'relu6', 'leaky_relu', 'silu' or "
                     "'hardswish', got kind %d", <int>act.kind)
        return CBN_ERR_ARG
    if act.kind == CBN_ACT_LEAKY_RELU and not (isfinite(act.negative_slope)
                                               and act.negative_slope >= 0):
        if d.msg != NULL and d.msg_size > 0:
            snprintf(d.msg, <size_t>d.msg_size,
                     "negative_slope must be a finite non-negative number, got %g",
                     act.negative_slope)
        return CBN_ERR_ARG
    if backward and cbn_act_from[act.kind] == 1 and output == NULL:
        return bad(d, "activation=%s needs output=, the forward's output",
                   cbn_act_names[act.kind])
    if backward and act.kind == CBN_ACT_NONE and output != NULL:
        return bad(d, "output= is only used with an activation%s", "")
    return CBN_OK


cdef inline bint empty_view(const cbn_desc* d) noexcept nogil:
    return d.M == 0 or d.C == 0 or d.K == 0


# ------------------------------------------------------------------------ the entries

cdef int32_t abi_forward(const cbn_desc* d, const cbn_forward_args* a) noexcept nogil:
    cdef int32_t r
    cdef Py_ssize_t c
    cdef double* sm
    cdef float* smf
    cdef cbn_desc p
    cdef cbn_eval_params_args e
    cdef char* tmp
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = check_abi_act(d, &a.act, NULL, False)
    if r == CBN_OK:
        r = check_eps_momentum(d, a.eps, a.momentum)
    if r == CBN_OK:
        r = (need(d, a.x, "x") or need(d, a.y, "y") or need(d, a.save_mean, "save_mean")
             or need(d, a.save_invstd, "save_invstd"))
    if r != CBN_OK:
        return r
    if a.training:
        if d.M * d.K == 1:
            if d.msg != NULL and d.msg_size > 0:
                snprintf(d.msg, <size_t>d.msg_size,
                         "Expected more than 1 value per channel when training, got input "
                         "size (M, C, K) = (%lld, %lld, %lld)", <long long>d.M,
                         <long long>d.C, <long long>d.K)
            return CBN_ERR_ARG
    elif a.running_mean == NULL or a.running_var == NULL:
        return bad(d, "running_mean and running_var must be given when training=False%s",
                   "")
    if not empty_view(d) or d.C == 0:
        return cbn_forward(d, a)
    # no values per channel: training statistics are NaN (as the Python API returns
    # them), eval ones those of the running statistics
    if a.training:
        for c in range(d.C):
            if d.compute == CBN_FLOAT64:
                (<double*>a.save_mean)[c] = NAN
                (<double*>a.save_invstd)[c] = NAN
            else:
                (<float*>a.save_mean)[c] = NAN
                (<float*>a.save_invstd)[c] = NAN
        return CBN_OK
    tmp = <char*>malloc(2 * d.C * 8)
    if tmp == NULL:
        return fail(d, CBN_ERR_NOMEM, "cbn: out of memory")
    p = d[0]
    e.eps = a.eps
    e.weight = a.weight
    e.bias = a.bias
    e.running_var = a.running_var
    e.invstd = a.save_invstd
    e.scale = tmp
    e.shift = tmp + d.C * 8
    r = cbn_eval_params(&p, &e)
    free(tmp)
    if r == CBN_OK:
        memcpy(a.save_mean, a.running_mean, d.C * (8 if d.compute == CBN_FLOAT64 else 4))
    return r


cdef int32_t abi_normalize(const cbn_desc* d, const cbn_normalize_args* a) noexcept nogil:
    cdef int32_t r
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = check_abi_act(d, &a.act, NULL, False)
    if r == CBN_OK:
        r = (need(d, a.x, "x") or need(d, a.y, "y") or need(d, a.mean, "mean")
             or need(d, a.scale, "scale") or need(d, a.shift, "shift"))
    if r != CBN_OK or empty_view(d):
        return r
    return cbn_normalize(d, a)


cdef int32_t abi_eval_params(const cbn_desc* d, const cbn_eval_params_args* a) noexcept nogil:
    cdef int32_t r
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = check_eps_momentum(d, a.eps, 0.0)
    if r == CBN_OK:
        r = (need(d, a.running_var, "running_var") or need(d, a.invstd, "invstd")
             or need(d, a.scale, "scale") or need(d, a.shift, "shift"))
    if r != CBN_OK or d.C == 0:
        return r
    return cbn_eval_params(d, a)


cdef int32_t abi_backward(const cbn_desc* d, const cbn_backward_args* a) noexcept nogil:
    cdef int32_t r
    cdef Py_ssize_t c
    cdef Py_ssize_t isz
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = check_abi_act(d, &a.act, a.output, True)
    if r == CBN_OK:
        r = (need(d, a.grad_output, "grad_output") or need(d, a.x, "x")
             or need(d, a.save_mean, "save_mean") or need(d, a.save_invstd, "save_invstd")
             or need(d, a.grad_input, "grad_input"))
    if r != CBN_OK:
        return r
    if not empty_view(d) or d.C == 0:
        return cbn_backward(d, a)
    isz = 8 if d.compute == CBN_FLOAT64 else 4          # no values: zero gradients
    if a.grad_weight != NULL:
        memset(a.grad_weight, 0, d.C * isz)
    if a.grad_bias != NULL:
        memset(a.grad_bias, 0, d.C * isz)
    return CBN_OK


cdef int32_t abi_moments(const cbn_desc* d, const cbn_moments_args* a) noexcept nogil:
    cdef int32_t r
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = need(d, a.x, "x") or need(d, a.mean, "mean") or need(d, a.m2, "m2")
    if r != CBN_OK:
        return r
    if empty_view(d):
        memset(a.mean, 0, d.C * sizeof(double))
        memset(a.m2, 0, d.C * sizeof(double))
        return CBN_OK
    return cbn_moments(d, a)


cdef int32_t abi_finish(const cbn_desc* d, const cbn_finish_args* a) noexcept nogil:
    cdef int32_t r
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = check_eps_momentum(d, a.eps, a.momentum)
    if r == CBN_OK:
        r = (need(d, a.mean, "mean") or need(d, a.m2, "m2") or need(d, a.save_mean, "save_mean")
             or need(d, a.save_invstd, "save_invstd") or need(d, a.scale, "scale")
             or need(d, a.shift, "shift"))
    if r == CBN_OK and not (a.count > 1):
        if d.msg != NULL and d.msg_size > 0:
            snprintf(d.msg, <size_t>d.msg_size,
                     "Expected more than 1 value per channel when training, got count %g",
                     a.count)
        r = CBN_ERR_ARG
    if r != CBN_OK or d.C == 0:
        return r
    return cbn_finish(d, a)


cdef int32_t abi_backward_reduce(const cbn_desc* d, const cbn_reduce_args* a) noexcept nogil:
    cdef int32_t r
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = check_abi_act(d, &a.act, a.output, True)
    if r == CBN_OK and cbn_act_from[a.act.kind] == 2:
        r = need(d, a.scale, "scale")
    if r == CBN_OK:
        r = (need(d, a.grad_output, "grad_output") or need(d, a.x, "x")
             or need(d, a.mean, "mean") or need(d, a.sum_dy, "sum_dy")
             or need(d, a.sum_dy_xmu, "sum_dy_xmu"))
    if r != CBN_OK:
        return r
    if empty_view(d):
        memset(a.sum_dy, 0, d.C * sizeof(double))
        memset(a.sum_dy_xmu, 0, d.C * sizeof(double))
        return CBN_OK
    return cbn_backward_reduce(d, a)


cdef int32_t abi_backward_elements(const cbn_desc* d,
                                   const cbn_elements_args* a) noexcept nogil:
    cdef int32_t r
    if d == NULL or a == NULL:
        return CBN_ERR_ARG
    r = check_desc(d)
    if r == CBN_OK:
        r = check_abi_act(d, &a.act, a.output, True)
    if r == CBN_OK:
        r = (need(d, a.grad_output, "grad_output") or need(d, a.x, "x")
             or need(d, a.mean, "mean") or need(d, a.invstd, "invstd")
             or need(d, a.sum_dy, "sum_dy") or need(d, a.sum_dy_xmu, "sum_dy_xmu")
             or need(d, a.grad_input, "grad_input"))
    if r == CBN_OK and not (a.count > 0):
        if d.msg != NULL and d.msg_size > 0:
            snprintf(d.msg, <size_t>d.msg_size, "count must be > 0, got %g", a.count)
        r = CBN_ERR_ARG
    if r != CBN_OK or empty_view(d):
        return r
    return cbn_backward_elements(d, a)


# ---------------------------------------------------------------------- the array view

cdef int32_t abi_view(cbn_desc* d, int32_t ndim, const int64_t* shape, const int64_t* strides,
                      int32_t axis) noexcept nogil:
    """desc's (M, C, K) view of a dense array in any axis order (see cbn.h)."""
    cdef int64_t itemsize
    cdef int32_t order[64]
    cdef int32_t n = 0, i, j, t
    cdef int64_t expect, M = 1, K = 1, total = 1
    cdef bint before = True
    if d == NULL:
        return CBN_ERR_ARG
    if d.storage == CBN_FLOAT64:
        itemsize = 8
    elif d.storage == CBN_FLOAT32:
        itemsize = 4
    elif d.storage == CBN_FLOAT16 or d.storage == CBN_BFLOAT16:
        itemsize = 2
    else:
        return bad(d, "%sunknown dtype code in the descriptor", "")
    if ndim < 1 or ndim > 64 or shape == NULL or strides == NULL:
        return bad(d, "%sndim must be from 1 to 64, with shape and strides", "")
    if axis < -ndim or axis >= ndim:
        if d.msg != NULL and d.msg_size > 0:
            snprintf(d.msg, <size_t>d.msg_size,
                     "axis %d is out of bounds for array of dimension %d", <int>axis,
                     <int>ndim)
        return CBN_ERR_ARG
    if axis < 0:
        axis += ndim
    for i in range(ndim):
        if shape[i] < 0:
            return bad(d, "%snegative dimensions are not allowed", "")
        total *= shape[i]
    if total != 0:
        # the axes of extent > 1 by decreasing stride (their order in memory)
        for i in range(ndim):
            if shape[i] > 1:
                j = n
                while j > 0 and strides[order[j - 1]] < strides[i]:
                    order[j] = order[j - 1]
                    j -= 1
                order[j] = i
                n += 1
        expect = itemsize
        for j in range(n - 1, -1, -1):
            t = order[j]
            if strides[t] != expect:
                return bad(d, "%sthe array is not one dense block in any order of its axes "
                              "(positive strides): make it contiguous", "")
            expect *= shape[t]
        for j in range(n):
            t = order[j]
            if t == axis:
                before = False
            elif before:
                M *= shape[t]
            else:
                K *= shape[t]
    else:
        for i in range(ndim):
            if i < axis:
                M *= shape[i]
            elif i > axis:
                K *= shape[i]
    d.M = M
    d.C = shape[axis]
    d.K = K
    d.stride_m = d.C * K
    d.stride_c = K
    d.stride_k = 1
    return CBN_OK


cdef const char* abi_status_name(int32_t status) noexcept nogil:
    if status == CBN_OK:
        return "ok"
    if status == CBN_ERR_ARG:
        return "invalid argument"
    if status == CBN_ERR_DTYPE:
        return "unsupported dtype"
    if status == CBN_ERR_NOMEM:
        return "out of memory"
    return NULL


# ------------------------------------------------------------------------ the table

cdef cbn_api _abi_table
cdef bytes _abi_version = b"0.1.0"
_abi_table.abi_version = CBN_ABI_VERSION
_abi_table.size = sizeof(cbn_api)
_abi_table.version = _abi_version
_abi_table.view = abi_view
_abi_table.forward = abi_forward
_abi_table.normalize = abi_normalize
_abi_table.eval_params = abi_eval_params
_abi_table.backward = abi_backward
_abi_table.moments = abi_moments
_abi_table.finish = abi_finish
_abi_table.backward_reduce = abi_backward_reduce
_abi_table.backward_elements = abi_backward_elements
_abi_table.status_name = abi_status_name

_C_API = PyCapsule_New(<void*>&_abi_table, b"cbn._kernels._C_API", NULL)

_ABI_ENTRIES = ("view", "forward", "normalize", "eval_params", "backward", "moments",
                "finish", "backward_reduce", "backward_elements", "status_name")


def capi():
    """The C ABI (cbn/include/cbn.h): a dict with ``"capsule"``, the PyCapsule
    ``cbn._kernels._C_API`` holding the table of entries (what ``cbn_import()`` and
    Cython's ``import_cbn()`` read), ``"abi_version"``, and the address of each entry as an
    int (``"forward"``, ``"backward"``, ... ``"view"``, ``"status_name"``), for ctypes,
    cffi and numba, which call C function pointers.

    Examples
    --------
    >>> import cbn
    >>> api = cbn.capi()
    >>> api["abi_version"], sorted(api)[:3]
    (1, ['abi_version', 'backward', 'backward_elements'])
    """
    cdef const cbn_api* t = &_abi_table
    addresses = {"view": <size_t>t.view, "forward": <size_t>t.forward,
                 "normalize": <size_t>t.normalize, "eval_params": <size_t>t.eval_params,
                 "backward": <size_t>t.backward, "moments": <size_t>t.moments,
                 "finish": <size_t>t.finish, "backward_reduce": <size_t>t.backward_reduce,
                 "backward_elements": <size_t>t.backward_elements,
                 "status_name": <size_t>t.status_name}
    return dict(addresses, capsule=_C_API, abi_version=int(t.abi_version))


# ------------------------------------------------------------- the XLA FFI handlers

cdef extern from "cbn_xla.h":
    const cbn_api* cbn_xla_cbn
    void* cbn_xla_forward
    void* cbn_xla_backward

cbn_xla_cbn = &_abi_table


def _xla_handlers():
    """{target name: PyCapsule of the XLA FFI handler} for jax.ffi.register_ffi_target
    (cbn/jax.py; cbn/src/cbn_xla.h documents the calls)."""
    return {"cbn_forward": PyCapsule_New(<void*>&cbn_xla_forward, NULL, NULL),
            "cbn_backward": PyCapsule_New(<void*>&cbn_xla_backward, NULL, NULL)}
