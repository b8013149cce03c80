/* cbn_ops.h: the operation table of one (dtype, CPU target), a template included by
 * cbn_instance.h after cbn_planes.h and cbn_rows.h with the same parameters.
 *
 * The table's entries take untyped data pointers and double scalars so that the float,
 * double, float16 and bfloat16 tables share one type (cbn_ops) and _kernels.pyx calls
 * any of them through the same code. Data pointers point to the storage type CBN_S,
 * lane parameter and accumulator arrays to the compute type CBN_T (float for float16
 * and bfloat16). A scalar is always a value of the compute type widened to double, so
 * the narrowing below is exact.
 */

#define P_(q) ((const CBN_T*)(q))       /* lane parameters and accumulators */
#define W_(q) ((CBN_T*)(q))
#define PS_(q) ((const CBN_S*)(q))      /* data */
#define WS_(q) ((CBN_S*)(q))

static void CBN_FN(op_runs_moments)(const void* p, Py_ssize_t nruns, Py_ssize_t n,
                                    Py_ssize_t stride, double* mean, double* m2, int pf,
                                    const cbn_carry* carry) {
    CBN_FN(runs_moments)(PS_(p), nruns, n, stride, mean, m2, pf, carry);
}

static void CBN_FN(op_runs_sums)(const void* g, const void* x, const void* ym,
                                 const void* res, void* dx, void* gr, Py_ssize_t nruns,
                                 Py_ssize_t n, Py_ssize_t stride, double mean, double scale,
                                 double shift, int act, double slope, double* sg,
                                 double* sgx, int pf) {
    CBN_FN(runs_sums)(PS_(g), PS_(x), PS_(ym), PS_(res), WS_(dx), WS_(gr), nruns, n, stride,
                      (CBN_T)mean, (CBN_T)scale, (CBN_T)shift, act, (CBN_T)slope, sg, sgx,
                      pf);
}

static void CBN_FN(op_runs_affine)(const void* x, const void* residual, void* y,
                                   Py_ssize_t nruns, Py_ssize_t n, const void* mean,
                                   const void* scale, const void* shift, int act,
                                   double slope) {
    CBN_FN(runs_affine)(PS_(x), PS_(residual), WS_(y), nruns, n, P_(mean), P_(scale),
                        P_(shift), act, (CBN_T)slope);
}

static void CBN_FN(op_runs_bwd)(const void* x, const void* g, const void* ym,
                                const void* res, void* dx, Py_ssize_t nruns, Py_ssize_t n,
                                const void* mean, const void* scale, const void* shift,
                                const void* gmean, const void* xcoef, int act,
                                double slope) {
    CBN_FN(runs_bwd)(PS_(x), PS_(g), PS_(ym), PS_(res), WS_(dx), nruns, n, P_(mean),
                     P_(scale), P_(shift), P_(gmean), P_(xcoef), act, (CBN_T)slope);
}

static void CBN_FN(op_run_affine_stream)(const void* x, const void* residual, void* y,
                                         Py_ssize_t n, double mean, double scale,
                                         double shift, int act, double slope) {
    CBN_FN(run_affine_stream)(PS_(x), PS_(residual), WS_(y), n, (CBN_T)mean, (CBN_T)scale,
                              (CBN_T)shift, act, (CBN_T)slope);
}

static void CBN_FN(op_run_bwd_stream)(const void* x, const void* g, const void* ym,
                                      const void* res, void* dx, Py_ssize_t n, double mean,
                                      double scale, double shift, double gmean,
                                      double xcoef, int act, double slope) {
    CBN_FN(run_bwd_stream)(PS_(x), PS_(g), PS_(ym), PS_(res), WS_(dx), n, (CBN_T)mean,
                           (CBN_T)scale, (CBN_T)shift, (CBN_T)gmean, (CBN_T)xcoef, act,
                           (CBN_T)slope);
}

static void CBN_FN(op_cols_shifted_sums)(const void* p, Py_ssize_t R, Py_ssize_t w,
                                         const void* shift, void* s1, void* s2) {
    CBN_FN(cols_shifted_sums)(PS_(p), R, w, P_(shift), W_(s1), W_(s2));
}

static void CBN_FN(op_cols_dev)(const void* p, Py_ssize_t R, Py_ssize_t w,
                                const void* mean, void* s1, void* s2) {
    CBN_FN(cols_dev)(PS_(p), R, w, P_(mean), W_(s1), W_(s2));
}

static void CBN_FN(op_cols_sums)(const void* g, const void* x, const void* ym,
                                 const void* res, void* dx, void* gr, Py_ssize_t R,
                                 Py_ssize_t w, const void* mean, const void* scale,
                                 const void* shift, int act, double slope, void* sg,
                                 void* sgx) {
    CBN_FN(cols_sums)(PS_(g), PS_(x), PS_(ym), PS_(res), WS_(dx), WS_(gr), R, w, P_(mean),
                      P_(scale), P_(shift), act, (CBN_T)slope, W_(sg), W_(sgx));
}

static void CBN_FN(op_cols_affine)(const void* x, const void* residual, void* y,
                                   Py_ssize_t R, Py_ssize_t w, const void* mean,
                                   const void* scale, const void* shift, int act,
                                   double slope) {
    CBN_FN(cols_affine)(PS_(x), PS_(residual), WS_(y), R, w, P_(mean), P_(scale), P_(shift),
                        act, (CBN_T)slope);
}

static void CBN_FN(op_cols_bwd)(const void* x, const void* g, const void* ym,
                                const void* res, void* dx, Py_ssize_t R, Py_ssize_t w,
                                const void* mean, const void* scale, const void* shift,
                                const void* gmean, const void* xcoef, int act,
                                double slope) {
    CBN_FN(cols_bwd)(PS_(x), PS_(g), PS_(ym), PS_(res), WS_(dx), R, w, P_(mean), P_(scale),
                     P_(shift), P_(gmean), P_(xcoef), act, (CBN_T)slope);
}

static void CBN_FN(op_rows_affine_stream)(const void* x, const void* residual, void* y,
                                          Py_ssize_t R, Py_ssize_t w, const void* mean,
                                          const void* scale, const void* shift, int act,
                                          double slope) {
    CBN_FN(rows_affine_stream)(PS_(x), PS_(residual), WS_(y), R, w, P_(mean), P_(scale),
                               P_(shift), act, (CBN_T)slope);
}

static void CBN_FN(op_rows_bwd_stream)(const void* x, const void* g, const void* ym,
                                       const void* res, void* dx, Py_ssize_t R,
                                       Py_ssize_t w, const void* mean, const void* scale,
                                       const void* shift, const void* gmean,
                                       const void* xcoef, int act, double slope) {
    CBN_FN(rows_bwd_stream)(PS_(x), PS_(g), PS_(ym), PS_(res), WS_(dx), R, w, P_(mean),
                            P_(scale), P_(shift), P_(gmean), P_(xcoef), act, (CBN_T)slope);
}

#undef P_
#undef W_
#undef PS_
#undef WS_

/* The table: static by default (the module's translation unit); a translation unit that
   compiles one target apart (cbn_region.h) defines CBN_OPS_LINKAGE as
   CBN_HIDDEN, giving its tables external linkage, hidden (the module exports nothing more),
   for cbn_kernels.h's extern declarations. */
#ifndef CBN_OPS_LINKAGE
#define CBN_OPS_LINKAGE static
#endif
CBN_OPS_LINKAGE const cbn_ops CBN_FN(ops) = {
    CBN_FN(op_runs_moments), CBN_FN(op_runs_sums), CBN_FN(op_runs_affine),
    CBN_FN(op_runs_bwd),
    CBN_FN(op_cols_shifted_sums), CBN_FN(op_cols_dev), CBN_FN(op_cols_sums), CBN_FN(op_cols_affine), CBN_FN(op_cols_bwd),
    CBN_FN(op_run_affine_stream), CBN_FN(op_run_bwd_stream),
    CBN_FN(op_rows_affine_stream), CBN_FN(op_rows_bwd_stream),
};
