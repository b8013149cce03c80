/* cbn_loops.h: what every CPU target's loops need before cbn_target.h instantiates them:
 * the vector lanes (cbn_simd.h), the activations (cbn_act.h), the forward's carried output
 * pass (cbn_carry), the operation table's type (cbn_ops), and the instruction sets of the
 * targets beyond the base one. Included by cbn_kernels.h (the module's translation unit)
 * and by the units of the targets compiled apart (CBN_TARGETS_APART, cbn_region.h).
 */
#ifndef CBN_LOOPS_H
#define CBN_LOOPS_H

#include "cbn_simd.h"
#include "cbn_act.h"

/* The forward's output pass carried along by a planes reduction (runs_moments), over a
   unit of the reduced unit's shape (x, y and residual at its first run, the same stride),
   done in the reduction's loop: y = act((x - mean) * scale + shift (+ residual)). The
   scalars are values of the compute type; x, residual and y are of the storage type;
   y, aligned to the element size, is stored non-temporally (whole lines; half storage
   off its alignment is stored with ordinary stores). */
typedef struct cbn_carry {
    const void* x;
    const void* residual;   /* or NULL */
    void* y;
    double mean, scale, shift;
    int act;                /* cbn_act_kind */
    double slope;           /* negative_slope */
} cbn_carry;

/* One (dtype, CPU target)'s loops. Data pointers untyped (to the storage type: float,
   double, or 2-byte float16 / bfloat16 values; offsets, strides and widths count
   values), lane parameter and accumulator arrays of the compute type (float for the
   float16 and bfloat16 tables), scalars values of the compute type widened to double. Each operation has its own entry with named parameters:
   act is a cbn_act_kind and slope its negative_slope; in the backward loops the
   activation's derivative is taken at ym (the forward's output) or at the pre-activation
   z = (x - mean) * scale + shift (+ res) (see cbn_act.h), scale being weight * invstd. */
typedef struct cbn_ops {
    /* planes: runs of one channel */
    /* pf: prefetch the next unit's runs (inputs larger than the cache); carry: NULL, or
       the forward's output pass done in the same loop (runs_moments) */
    void (*runs_moments)(const void* p, Py_ssize_t nruns, Py_ssize_t n, Py_ssize_t stride,
                         double* mean, double* m2, int pf, const cbn_carry* carry);
    void (*runs_sums)(const void* g, const void* x, const void* ym, const void* res,
                      void* dx, void* gr, Py_ssize_t nruns, Py_ssize_t n,
                      Py_ssize_t stride, double mean, double scale, double shift, int act,
                      double slope, double* sg, double* sgx, int pf);
    /* nruns >= 1 consecutive runs of n values, run r with parameters mean[r],
       scale[r], shift[r] (arrays of the compute type; shift NULL: zeros) */
    void (*runs_affine)(const void* x, const void* residual, void* y, Py_ssize_t nruns,
                        Py_ssize_t n, const void* mean, const void* scale,
                        const void* shift, int act, double slope);
    /* nruns consecutive runs, as runs_affine (gmean and xcoef arrays too) */
    void (*runs_bwd)(const void* x, const void* g, const void* ym, const void* res,
                     void* dx, Py_ssize_t nruns, Py_ssize_t n, const void* mean,
                     const void* scale, const void* shift, const void* gmean,
                     const void* xcoef, int act, double slope);
    /* rows: blocks of R rows of w values with per-lane parameters */
    void (*cols_shifted_sums)(const void* p, Py_ssize_t R, Py_ssize_t w, const void* shift,
                              void* s1, void* s2);
    void (*cols_dev)(const void* p, Py_ssize_t R, Py_ssize_t w, const void* mean,
                     void* s1, void* s2);
    void (*cols_sums)(const void* g, const void* x, const void* ym, const void* res,
                      void* dx, void* gr, Py_ssize_t R, Py_ssize_t w, const void* mean,
                      const void* scale, const void* shift, int act, double slope,
                      void* sg, void* sgx);
    void (*cols_affine)(const void* x, const void* residual, void* y, Py_ssize_t R,
                        Py_ssize_t w, const void* mean, const void* scale,
                        const void* shift, int act, double slope);
    void (*cols_bwd)(const void* x, const void* g, const void* ym, const void* res,
                     void* dx, Py_ssize_t R, Py_ssize_t w, const void* mean,
                     const void* scale, const void* shift, const void* gmean,
                     const void* xcoef, int act, double slope);
    /* planes, non-temporal stores (outputs larger than the cache) */
    void (*run_affine_stream)(const void* x, const void* residual, void* y, Py_ssize_t n,
                              double mean, double scale, double shift, int act,
                              double slope);
    void (*run_bwd_stream)(const void* x, const void* g, const void* ym, const void* res,
                           void* dx, Py_ssize_t n, double mean, double scale, double shift,
                           double gmean, double xcoef, int act, double slope);
    /* rows, non-temporal stores: w a multiple of a line's values, y on a line */
    void (*rows_affine_stream)(const void* x, const void* residual, void* y, Py_ssize_t R,
                               Py_ssize_t w, const void* mean, const void* scale,
                               const void* shift, int act, double slope);
    void (*rows_bwd_stream)(const void* x, const void* g, const void* ym, const void* res,
                            void* dx, Py_ssize_t R, Py_ssize_t w, const void* mean,
                            const void* scale, const void* shift, const void* gmean,
                            const void* xcoef, int act, double slope);
} cbn_ops;

/* The targets beyond the base one (x86-64 with GCC, CBN_MULTI_TARGET): the ISA each
   enables, as `#pragma GCC target` strings, and CBN_PRAGMA_TARGET(isa), that pragma (its
   region opened by `#pragma GCC push_options`, closed by `pop_options`). One definition
   for cbn_kernels.h and the translation units of the targets compiled apart, so both
   builds compile the same code. */
#define CBN_ISA_AVX2 "avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,popcnt,sse4.2"
#define CBN_ISA_AVX512 \
    "avx512f,avx512vl,avx512bw,avx512dq,avx512cd,avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,popcnt,sse4.2"
/* avx512 and AVX512-BF16 (vcvtneps2bf16): only the bfloat16 loops are compiled for it (the
   avx512bf16 target takes the avx512 target's other tables; see cbn_store.h) */
#define CBN_ISA_AVX512BF16                                                              \
    "avx512f,avx512vl,avx512bw,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi,bmi2,f16c,lzcnt," \
    "movbe,popcnt,sse4.2"
#define CBN_PRAGMA_(x) _Pragma(#x)
#define CBN_PRAGMA_TARGET(isa) CBN_PRAGMA_(GCC target(isa))

/* External linkage that the extension module does not export (a target's tables, when
   the target is compiled apart). */
#define CBN_HIDDEN __attribute__((visibility("hidden")))

#endif /* CBN_LOOPS_H */
