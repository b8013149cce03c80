/* cbn_ops.h: the operation table of one (dtype, CPU target), a template included by
 * cbn_kernels.h after cbn_planes.h and cbn_rows.h with the same parameters.
 *
 * The table's entries take untyped data pointers and double scalars so that the float
 * and double tables share one type (cbn_ops) and _kernels.pyx calls either through the
 * same code. A scalar is always a value of the element type widened to double, so the
 * narrowing below is exact.
 */

static void CBN_FN(op_runs_moments)(const void* p, Py_ssize_t nruns, Py_ssize_t n,
                                    Py_ssize_t stride, double* mean, double* m2, int pf,
                                    const cbn_carry* carry) {
    CBN_FN(runs_moments)((const CBN_T*)p, nruns, n, stride, mean, m2, pf, carry);
}

static void CBN_FN(op_runs_sums)(const void* g, const void* x, const void* ym, void* dx,
                                 void* gr, Py_ssize_t nruns, Py_ssize_t n,
                                 Py_ssize_t stride, double mean, double scale, double* sg,
                                 double* sgx, int pf) {
    CBN_FN(runs_sums)((const CBN_T*)g, (const CBN_T*)x, (const CBN_T*)ym, (CBN_T*)dx,
                      (CBN_T*)gr, nruns, n, stride, (CBN_T)mean, (CBN_T)scale, sg, sgx, pf);
}

static void CBN_FN(op_run_affine)(const void* x, const void* residual, void* y,
                                  Py_ssize_t n, double mean, double scale, double shift,
                                  int relu) {
    CBN_FN(run_affine)((const CBN_T*)x, (const CBN_T*)residual, (CBN_T*)y, n, (CBN_T)mean,
                       (CBN_T)scale, (CBN_T)shift, relu);
}

static void CBN_FN(op_run_bwd)(const void* x, const void* g, const void* ym, void* dx,
                               Py_ssize_t n, double mean, double scale, double gmean,
                               double xcoef) {
    CBN_FN(run_bwd)((const CBN_T*)x, (const CBN_T*)g, (const CBN_T*)ym, (CBN_T*)dx, n,
                    (CBN_T)mean, (CBN_T)scale, (CBN_T)gmean, (CBN_T)xcoef);
}

static void CBN_FN(op_run_affine_stream)(const void* x, const void* residual, void* y,
                                         Py_ssize_t n, double mean, double scale,
                                         double shift, int relu) {
    CBN_FN(run_affine_stream)((const CBN_T*)x, (const CBN_T*)residual, (CBN_T*)y, n,
                              (CBN_T)mean, (CBN_T)scale, (CBN_T)shift, relu);
}

static void CBN_FN(op_run_bwd_stream)(const void* x, const void* g, const void* ym, void* dx,
                                      Py_ssize_t n, double mean, double scale, double gmean,
                                      double xcoef) {
    CBN_FN(run_bwd_stream)((const CBN_T*)x, (const CBN_T*)g, (const CBN_T*)ym, (CBN_T*)dx, n,
                           (CBN_T)mean, (CBN_T)scale, (CBN_T)gmean, (CBN_T)xcoef);
}

static void CBN_FN(op_cols_shifted_sums)(const void* p, Py_ssize_t R, Py_ssize_t w,
                                         const void* shift, void* s1, void* s2) {
    CBN_FN(cols_shifted_sums)((const CBN_T*)p, R, w, (const CBN_T*)shift, (CBN_T*)s1,
                              (CBN_T*)s2);
}

static void CBN_FN(op_cols_dev)(const void* p, Py_ssize_t R, Py_ssize_t w,
                                const void* mean, void* s1, void* s2) {
    CBN_FN(cols_dev)((const CBN_T*)p, R, w, (const CBN_T*)mean, (CBN_T*)s1, (CBN_T*)s2);
}

static void CBN_FN(op_cols_sums)(const void* g, const void* x, const void* ym, void* dx,
                                 void* gr, Py_ssize_t R, Py_ssize_t w, const void* mean,
                                 const void* scale, void* sg, void* sgx) {
    CBN_FN(cols_sums)((const CBN_T*)g, (const CBN_T*)x, (const CBN_T*)ym, (CBN_T*)dx,
                      (CBN_T*)gr, R, w, (const CBN_T*)mean, (const CBN_T*)scale,
                      (CBN_T*)sg, (CBN_T*)sgx);
}

static void CBN_FN(op_cols_apply)(int op, const void* x, const void* g, const void* q,
                                  void* y, Py_ssize_t R, Py_ssize_t w, const void* a,
                                  const void* b, const void* c, const void* d, int relu) {
    CBN_FN(cols_apply)(op, (const CBN_T*)x, (const CBN_T*)g, (const CBN_T*)q, (CBN_T*)y,
                       R, w, (const CBN_T*)a, (const CBN_T*)b, (const CBN_T*)c,
                       (const CBN_T*)d, relu);
}

static void CBN_FN(op_rows_stream)(int op, const void* x, const void* g, const void* q,
                                   void* y, Py_ssize_t R, Py_ssize_t w, const void* a,
                                   const void* b, const void* c, const void* d, int relu) {
    CBN_FN(rows_stream)(op, (const CBN_T*)x, (const CBN_T*)g, (const CBN_T*)q, (CBN_T*)y,
                        R, w, (const CBN_T*)a, (const CBN_T*)b, (const CBN_T*)c,
                        (const CBN_T*)d, relu);
}

static const cbn_ops CBN_FN(ops) = {
    CBN_FN(op_runs_moments), CBN_FN(op_runs_sums), CBN_FN(op_run_affine),
    CBN_FN(op_run_bwd), CBN_FN(op_cols_shifted_sums), CBN_FN(op_cols_dev),
    CBN_FN(op_cols_sums), CBN_FN(op_cols_apply), CBN_FN(op_run_affine_stream),
    CBN_FN(op_run_bwd_stream), CBN_FN(op_rows_stream),
};
