# cython: language_level=3, boundscheck=False, wraparound=False
# A downstream extension, as a user writes one: it cimports cbn's C ABI and calls cbn from
# its own `prange` without the GIL (tests/test_capi.py builds it against the installed cbn).

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t

from cbn.capi cimport *

cdef const cbn_api* api = import_cbn()


def abi_version():
    return api.abi_version


cdef void describe(cbn_desc* d, int dtype, int64_t M, int64_t C, int64_t K,
                   char* msg) noexcept nogil:
    d.version = CBN_DESC_VERSION
    d.storage = dtype
    d.compute = dtype
    d.nthreads = 1
    d.M = M
    d.C = C
    d.K = K
    d.stride_m = C * K
    d.stride_c = K
    d.stride_k = 1
    d.scratch = NULL
    d.scratch_bytes = 0
    d.msg = msg
    d.msg_size = 200


cdef int one_step(int dtype, const void* x, const void* g, void* y, void* dx, const void* w,
                  const void* b, void* sm, void* si, void* gw, void* gb, int64_t M,
                  int64_t C, int64_t K) noexcept nogil:
    """A training forward and its backward on one (M, C, K) array."""
    cdef cbn_desc d
    cdef cbn_forward_args a
    cdef cbn_backward_args k
    cdef char msg[200]
    cdef int r
    describe(&d, dtype, M, C, K, msg)
    a.training = 1
    a.reserved = 0
    a.act.kind = CBN_ACT_NONE
    a.act.reserved = 0
    a.act.negative_slope = 0.0
    a.momentum = 0.1
    a.eps = 1e-5
    a.x = x
    a.residual = NULL
    a.y = y
    a.weight = w
    a.bias = b
    a.running_mean = NULL
    a.running_var = NULL
    a.save_mean = sm
    a.save_invstd = si
    r = api.forward(&d, &a)
    if r != CBN_OK:
        return r
    k.training = 1
    k.reserved = 0
    k.act = a.act
    k.grad_output = g
    k.x = x
    k.output = NULL
    k.residual = NULL
    k.weight = w
    k.bias = b
    k.save_mean = sm
    k.save_invstd = si
    k.grad_input = dx
    k.grad_weight = gw
    k.grad_bias = gb
    k.grad_residual = NULL
    return api.backward(&d, &k)


def steps(floating[:, :, :, ::1] x, floating[:, :, :, ::1] g, floating[:, :, :, ::1] y,
          floating[:, :, :, ::1] dx, floating[::1] w, floating[::1] b,
          floating[:, ::1] sm, floating[:, ::1] si, floating[:, ::1] gw,
          floating[:, ::1] gb, int[::1] status, int nthreads):
    """one_step on every x[i] (each an (M, C, K) array) in a prange over i, without the GIL;
    status[i] is each call's result."""
    cdef Py_ssize_t i
    cdef int dtype = CBN_FLOAT32 if floating is float else CBN_FLOAT64
    for i in prange(x.shape[0], nogil=True, num_threads=nthreads, schedule="dynamic"):
        status[i] = one_step(dtype, &x[i, 0, 0, 0], &g[i, 0, 0, 0], &y[i, 0, 0, 0],
                             &dx[i, 0, 0, 0], &w[0], &b[0], &sm[i, 0], &si[i, 0],
                             &gw[i, 0], &gb[i, 0], x.shape[1], x.shape[2], x.shape[3])
