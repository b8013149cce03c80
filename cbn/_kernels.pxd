# Declarations of cbn's C loops (cbn/src/*.h) for cbn/_kernels.pyx.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int cbn_openmp_enabled(void) { return 1; }
    static int cbn_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int cbn_openmp_enabled(void) { return 0; }
    static int cbn_max_threads(void) { return 1; }
    #endif
    """
    int cbn_openmp_enabled() noexcept nogil
    int cbn_max_threads() noexcept nogil


cdef extern from "cbn_kernels.h" nogil:
    # One CPU target's C loops for one dtype; data pointers untyped, scalars widened to
    # double (see cbn/src/cbn_kernels.h and cbn_ops.h for each loop's contract).
    ctypedef struct cbn_carry:
        const void* x
        const void* residual
        void* y
        double mean, scale, shift
        int relu

    ctypedef struct cbn_ops:
        void (*runs_moments)(const void* p, Py_ssize_t nruns, Py_ssize_t n,
                             Py_ssize_t stride, double* mean, double* m2, int pf,
                             const cbn_carry* carry) noexcept nogil
        void (*runs_sums)(const void* g, const void* x, const void* ym, void* dx, void* gr,
                          Py_ssize_t nruns, Py_ssize_t n, Py_ssize_t stride, double mean,
                          double scale, double* sg, double* sgx, int pf) noexcept nogil
        void (*run_affine)(const void* x, const void* residual, void* y, Py_ssize_t n,
                           double mean, double scale, double shift, int relu) noexcept nogil
        void (*run_bwd)(const void* x, const void* g, const void* ym, void* dx, Py_ssize_t n,
                        double mean, double scale, double gmean,
                        double xcoef) noexcept nogil
        void (*cols_shifted_sums)(const void* p, Py_ssize_t R, Py_ssize_t w,
                                  const void* shift, void* s1, void* s2) noexcept nogil
        void (*cols_dev)(const void* p, Py_ssize_t R, Py_ssize_t w, const void* mean,
                         void* s1, void* s2) noexcept nogil
        void (*cols_sums)(const void* g, const void* x, const void* ym, void* dx, void* gr,
                          Py_ssize_t R, Py_ssize_t w, const void* mean, const void* scale,
                          void* sg, void* sgx) noexcept nogil
        void (*cols_apply)(int op, const void* x, const void* g, const void* q, void* y,
                           Py_ssize_t R, Py_ssize_t w, const void* a, const void* b,
                           const void* c, const void* d, int relu) noexcept nogil
        void (*run_affine_stream)(const void* x, const void* residual, void* y,
                                  Py_ssize_t n, double mean, double scale, double shift,
                                  int relu) noexcept nogil
        void (*run_bwd_stream)(const void* x, const void* g, const void* ym, void* dx,
                               Py_ssize_t n, double mean, double scale, double gmean,
                               double xcoef) noexcept nogil
        void (*rows_stream)(int op, const void* x, const void* g, const void* q, void* y,
                            Py_ssize_t R, Py_ssize_t w, const void* a, const void* b,
                            const void* c, const void* d, int relu) noexcept nogil

    const cbn_ops* cbn_ops_f() noexcept
    const cbn_ops* cbn_ops_d() noexcept
    const char* cbn_target_name() noexcept
    int cbn_target_count() noexcept
    const char* cbn_target_at(int i) noexcept
    int cbn_target_supported_at(int i) noexcept
    int cbn_select_target(const char* name) noexcept
    const char* cbn_build_flags() noexcept
    void cbn_sfence() noexcept


cdef extern from "cbn_team.h" nogil:
    # Adaptive team size under contention (see cbn/src/cbn_team.h).
    ctypedef long long int64_t
    int cbn_team_adaptive
    int64_t cbn_team_serial_until
    int64_t cbn_team_backoff
    int64_t cbn_team_stalls
    int64_t cbn_now_ns() noexcept
    int cbn_team_size(int requested) noexcept
    void cbn_team_report(int64_t wall, int64_t busy, int nthreads) noexcept


cdef extern from "cbn_cache.h" nogil:
    # The last-level cache, read once at import (see cbn/src/cbn_cache.h).
    long long cbn_cache_size
    int cbn_cache_level
    int cbn_cache_sharing
    const char* cbn_cache_source
    void cbn_cache_probe() noexcept
