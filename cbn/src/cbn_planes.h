/* cbn_planes.h: loops over contiguous runs of one channel (the "planes" kernels).
 *
 * A template, included by cbn_kernels.h once per (dtype, CPU target), with:
 *   CBN_T       the compute type (float or double)
 *   CBN_S       the storage type of the data arrays (CBN_T, or float16 / bfloat16 with
 *               CBN_T float: see cbn_store.h, whose macros every data access goes through)
 *   CBN_IT      the integer type of CBN_T's width (for lane masks)
 *   CBN_L       lanes per 32-byte vector (8 for float, 4 for double)
 *   CBN_SUF     f, d, h or b, and CBN_TARGET (base, avx2, avx512): the name suffixes
 *               (CBN_FN)
 *
 * Offsets and strides of the data are in stored values; the scalar parameters are of
 * the compute type.
 *
 * A run is n contiguous values of one channel; a unit is nruns such runs, stride values
 * apart (the same channel in consecutive batch entries). The loops keep four independent
 * vector accumulators (one is 4x slower: every add would wait for the previous one) and
 * combine them in a fixed order, so results never depend on the instruction set.
 *
 * Operations, each named for what it computes:
 *   runs_moments  count, mean and M2 (sum of squared deviations) of a unit
 *   runs_sums     sum(g) and sum(g * (x - mean)) of a unit (the backward reduction)
 *   runs_affine   y = act((x - mean) * scale + shift (+ residual)): the output pass,
 *                 over consecutive runs, each with its own parameters
 *   runs_bwd      dx = (g - gmean - (x - mean) * xcoef) * scale: the training backward,
 *                 over consecutive runs, each with its own parameters
 * The activation (cbn_act.h) is a constant ACT in each copy of a loop; in the backward
 * g is first multiplied by its derivative, at ym (the forward's output) or at the
 * pre-activation z = (x - mean) * scale + shift (+ res), recomputed in the same pass.
 *   run_affine_stream, run_bwd_stream
 *                 the same, storing whole vectors non-temporally (outputs larger than
 *                 the cache: no read of the output's lines, no eviction of the input's)
 */

/* (The vector types CBN_FN(v), CBN_FN(m) and the data's loads and stores, CBN_SLOAD,
   CBN_SSTORE, CBN_GET, CBN_PUT, CBN_PART, CBN_VSTREAM: cbn_store.h.) */

/* A unit of several short runs (planes of one channel, C*K apart) ends where the next
   channel's unit of the same batch entries begins, run by run: while a run is reduced,
   the same offset n values on (the next unit's run) is prefetched, 128 bytes (4 vectors)
   per step. A run that short is over before the hardware prefetcher has caught its
   stream; a prefetch changes no result. */
#define CBN_PREFETCH_NEXT(p) do {                                                     \
        __builtin_prefetch((p), 0, 3);                                                  \
        __builtin_prefetch((const char*)(p) + 64, 0, 3);                                \
    } while (0)

/* g times the activation's derivative, for the vector at offset i of the backward loops
   (ACT a constant; vm, vk, vsh: mean, scale and shift splatted; x_: x there). */
#define CBN_DACT_STEP(i, g_, x_) do {                                                   \
        if (ACT != CBN_ACT_NONE) {                                                      \
            V s_;                                                                       \
            if (cbn_act_needs_z(ACT)) {                                                 \
                s_ = (x_ - vm) * vk + vsh;                                              \
                if (res) { V r_; CBN_SLOAD(r_, res + (i)); s_ += r_; }                  \
            } else {                                                                    \
                CBN_SLOAD(s_, ym + (i));                                                \
            }                                                                           \
            CBN_DACT_V(ACT, IV, V, g_, s_, slope);                                      \
        }                                                                               \
    } while (0)

/* The same for the value at offset i, as an expression of type CBN_T. */
#define CBN_DACT_ONE(i, gv)                                                             \
    (ACT == CBN_ACT_NONE ? (gv)                                                         \
     : CBN_DACT_S(ACT, CBN_T, gv,                                                       \
                  (cbn_act_needs_z(ACT)                                                 \
                   ? (res ? (CBN_GET(x, i) - mean) * scale + shift + CBN_GET(res, i)    \
                      : (CBN_GET(x, i) - mean) * scale + shift)                         \
                   : CBN_GET(ym, i)), slope))

/* One vector of the backward sums at offset i: g times the activation's derivative
   (CBN_DACT_STEP), stored in gr (if gr); sum(g) accumulated in A and sum(g * (x - mean))
   in B, and dx = g * scale written (if dx). */
#define CBN_SUMS_STEP(i, A, B) do {                                                     \
        V g_, x_;                                                                       \
        CBN_SLOAD(g_, g + (i)); CBN_SLOAD(x_, x + (i));                                 \
        CBN_DACT_STEP(i, g_, x_);                                                       \
        if (gr) CBN_SSTORE(gr + (i), g_);                                               \
        A += g_; B += g_ * (x_ - vm);                                                   \
        if (dx) { x_ = g_ * vk; CBN_SSTORE(dx + (i), x_); }                             \
    } while (0)

/* The same for a 64-byte vector (W), without an activation (wm, wk: mean and scale). */
#define CBN_SUMS_STEP_W(i, A, B) do {                                                   \
        W g_, x_;                                                                       \
        CBN_SLOAD(g_, g + (i)); CBN_SLOAD(x_, x + (i));                                 \
        if (gr) CBN_SSTORE(gr + (i), g_);                                               \
        A += g_; B += g_ * (x_ - wm);                                                   \
        if (dx) { x_ = g_ * wk; CBN_SSTORE(dx + (i), x_); }                             \
    } while (0)


/* How many values before p + i reaches the start of a cache line (64 bytes). The
   streaming loops store those with ordinary stores, then whole lines non-temporally
   (two vectors per line), then the rest of the run with ordinary stores again, so that
   no line gets both kinds of store: a non-temporal store into a line that an ordinary
   store has brought into the cache, or the reverse, costs a partial write-combining
   flush (measured: with outputs 16 bytes off a line, the carried output pass of the
   blocked forward lost most of its gain). The values are the same either way. */
#define CBN_TO_ALIGN(p) ((Py_ssize_t)(((64 - ((uintptr_t)(p) & 63)) & 63) / sizeof(CBN_S)))

/* run_affine_body without streaming, out of line (the few values of a carried run
   before its first line boundary and after its last whole lines). */
static CBN_NOINLINE void CBN_FN(run_affine_edge)(const CBN_S* x, const CBN_S* residual,
                                                 CBN_S* y, Py_ssize_t n, CBN_T mean,
                                                 CBN_T scale, CBN_T shift, int act,
                                                 CBN_T slope);

#define CBN_WIDE_RUN 128        /* see runs_shifted_sums */
#if CBN_WIDE
/* The 32-byte accumulators v0..v3 of a reduction from the two 64-byte ones of its wide
   loop (a holds v0 and v1, b holds v2 and v3: see runs_shifted_sums). */
static CBN_INLINE void CBN_FN(wsplit)(CBN_FN(w) a, CBN_FN(w) b, CBN_FN(v)* v0,
                                      CBN_FN(v)* v1, CBN_FN(v)* v2, CBN_FN(v)* v3) {
    *v0 = CBN_FN(wlo)(a); *v1 = CBN_FN(whi)(a);
    *v2 = CBN_FN(wlo)(b); *v3 = CBN_FN(whi)(b);
}
#endif

/* One vector of a carried output pass (see runs_shifted_sums) at offset o: the same
   arithmetic as run_affine_body's, in vectors of CBN_CW values: 64-byte ones where those
   are registers, else 32-byte ones. */
#if CBN_WIDE
#define CBN_CW (2 * CBN_L)
#define CBN_CV CBN_FN(w)
#define CBN_CIV CBN_FN(wm)
#define CBN_CSTREAM CBN_WSTREAM
#else
#define CBN_CW CBN_L
#define CBN_CV CBN_FN(v)
#define CBN_CIV CBN_FN(m)
#define CBN_CSTREAM CBN_VSTREAM
#endif
#define CBN_CARRY_STEP(o) do {                                                          \
        CBN_CV c_, r_;                                                                  \
        CBN_SLOAD(c_, cx + (o)); c_ = (c_ - cmean) * cscale + cshift;                   \
        if (res) { CBN_SLOAD(r_, cres + (o)); c_ += r_; }                               \
        CBN_ACT_V(ACT, CBN_CIV, CBN_CV, c_, cslope);                                    \
        CBN_CSTREAM(cy + (o), c_);                                                      \
    } while (0)

/* s1 = sum of d = x - shift and s2 = sum of d*d over nruns runs of n >= 1 values, run j
   at p + j*stride: four vector accumulators per sum, a run's last n % CBN_L values
   padded with the shift (d = 0 there), lanes combined in a fixed order. pf: prefetch
   the next unit (CBN_PREFETCH_NEXT).

   carry (NULL in all but runs_shifted_sums_carry's calls): an output pass over another unit
   of the same shape (carry->x, ->y, ->residual at its first run, the same stride), done
   in the same loop, a vector's worth of output per vector read; carry->y aligned to the
   element size, stored non-temporally from each run's first line boundary; res and
   ACT: carry->residual is not NULL, carry->act (constants in each copy, like pf: the
   loop then has no tests, and no accumulator is spilled to memory). The channel-blocked
   forward reduces one group while writing the previous group's output, so that one core
   reads memory while it writes (cbn/_blocked.pxi). The carried output is
   run_affine_body's, value for value; the sums do not change. */
static CBN_INLINE void CBN_FN(runs_shifted_sums)(const CBN_S* p, Py_ssize_t nruns,
                                                 Py_ssize_t n, Py_ssize_t stride,
                                                 CBN_T shift, double* s1, double* s2,
                                                 int pf, const cbn_carry* carry,
                                                 const int res, const int ACT) {
    typedef CBN_FN(v) V;
    const Py_ssize_t B = 4 * CBN_L, nv = n - n % B, n1 = n - n % CBN_L;
    const V vm = CBN_SPLAT(V, shift);
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    V x0, x1;
    V x2, x3;
#if CBN_WIDE
    /* 64-byte accumulators where those are registers, on runs of CBN_WIDE_RUN values or
       more (and carried ones, which are long): A0 holds a0 (its first CBN_L lanes) and
       a1, A1 holds a2 and a3, the same sums lane for lane in half the instructions. A
       tail's vector goes to its half, the other half adding +0: exact, as an accumulator
       that starts at +0 never holds -0. Shorter runs keep the 32-byte accumulators: their
       tails would chain one more addition per run on A0 (16x2048x7x7 measured 5-8%
       slower). */
    typedef CBN_FN(w) W;
    const int wide = carry != NULL || n >= CBN_WIDE_RUN;
    const W wm = CBN_SPLAT(W, shift);
    const V zero = {0};
    W A0 = {0}, A1 = {0}, B0 = {0}, B1 = {0}, z0, z1;
#endif
    Py_ssize_t i, j, k, head = 0, cend = 0;
    double s = 0.0, ss = 0.0;
    CBN_T pad[CBN_L];
    const CBN_S* q;
    const CBN_S *cx = NULL, *cres = NULL;
    CBN_S* cy = NULL;
    CBN_T cm = 0, cs = 0, ch = 0, cslope = 0;
    CBN_CV cmean = {0}, cscale = {0}, cshift = {0};
    if (carry) {
        cx = (const CBN_S*)carry->x;
        cres = res ? (const CBN_S*)carry->residual : NULL;
        cy = (CBN_S*)carry->y;
        cm = (CBN_T)carry->mean; cs = (CBN_T)carry->scale; ch = (CBN_T)carry->shift;
        cslope = (CBN_T)carry->slope;
        cmean = CBN_SPLAT(CBN_CV, cm); cscale = CBN_SPLAT(CBN_CV, cs);
        cshift = CBN_SPLAT(CBN_CV, ch);
    }
    for (k = 0, q = p; k < nruns; k++, q += stride) {
        if (carry) {
            /* the carried run's non-temporal stores start at its first line boundary
               (head values before it) and end at cend, whole lines (B values are one
               line (half storage) or two at least); the values outside, ordinary stores (run_affine_edge) */
            head = CBN_TO_ALIGN(cy);
            if (head > n) head = n;
            if (sizeof(CBN_S) < sizeof(CBN_T) && (uintptr_t)cy % sizeof(CBN_S) != 0)
                head = n;                   /* half storage off its alignment: no stream */
            cend = head + (n - head) / B * B;
            if (head > 0)
                CBN_FN(run_affine_edge)(cx, cres, cy, head, cm, cs, ch, ACT, cslope);
        }
        for (i = 0; i < nv; i += B) {
            if (pf) CBN_PREFETCH_NEXT(q + n + i);
#if CBN_WIDE
            if (wide) {
                CBN_SLOAD(z0, q + i); CBN_SLOAD(z1, q + i + 2 * CBN_L);
                z0 -= wm; z1 -= wm;
                A0 += z0; A1 += z1;
                B0 += z0 * z0; B1 += z1 * z1;
            } else
#endif
            {
                CBN_SLOAD(x0, q + i); CBN_SLOAD(x1, q + i + CBN_L);
                CBN_SLOAD(x2, q + i + 2 * CBN_L); CBN_SLOAD(x3, q + i + 3 * CBN_L);
                x0 -= vm; x1 -= vm; x2 -= vm; x3 -= vm;
                a0 += x0; a1 += x1; a2 += x2; a3 += x3;
                b0 += x0 * x0; b1 += x1 * x1; b2 += x2 * x2; b3 += x3 * x3;
            }
            if (carry && head + i < cend) {     /* (cend - head <= nv) */
                for (j = 0; j < B; j += CBN_CW) CBN_CARRY_STEP(head + i + j);
            }
        }
        for (; i < n1; i += CBN_L) {
            CBN_SLOAD(x0, q + i); x0 -= vm;
#if CBN_WIDE
            if (wide) { z0 = CBN_FN(wjoin)(x0, zero); A0 += z0; B0 += z0 * z0; } else
#endif
            { a0 += x0; b0 += x0 * x0; }
        }
        if (i < n) {            /* the last values, padded with the shift */
            CBN_PART(x1, vm, q + i, n - i, pad);
            x1 -= vm;
#if CBN_WIDE
            if (wide) { z1 = CBN_FN(wjoin)(zero, x1); A0 += z1; B0 += z1 * z1; } else
#endif
            { a1 += x1; b1 += x1 * x1; }
        }
        if (carry) {
            if (cend < n)
                CBN_FN(run_affine_edge)(cx + cend, cres ? cres + cend : NULL, cy + cend,
                                        n - cend, cm, cs, ch, ACT, cslope);
            cx += stride; cy += stride;
            if (cres) cres += stride;
        }
    }
#if CBN_WIDE
    if (wide) {
        CBN_FN(wsplit)(A0, A1, &a0, &a1, &a2, &a3);
        CBN_FN(wsplit)(B0, B1, &b0, &b1, &b2, &b3);
    }
#endif
    a0 = (a0 + a1) + (a2 + a3);
    b0 = (b0 + b1) + (b2 + b3);
    for (j = 0; j < CBN_L; j++) { s += a0[j]; ss += b0[j]; }
    *s1 = s;
    *s2 = ss;
}

/* runs_shifted_sums with a carry, one copy of the loop per (pf, residual, activation). */
static CBN_NOINLINE void CBN_FN(runs_shifted_sums_carry)(const CBN_S* p, Py_ssize_t nruns,
                                                         Py_ssize_t n, Py_ssize_t stride,
                                                         CBN_T shift, double* s1,
                                                         double* s2, int pf,
                                                         const cbn_carry* carry) {
    const int res = carry->residual != NULL;
#define CBN_ACT_STMT_                                                                   \
    if (pf) {                                                                           \
        if (res) CBN_FN(runs_shifted_sums)(p, nruns, n, stride, shift, s1, s2, 1, carry,  \
                                           1, ACT);                                     \
        else CBN_FN(runs_shifted_sums)(p, nruns, n, stride, shift, s1, s2, 1, carry, 0,   \
                                       ACT);                                            \
    } else {                                                                            \
        if (res) CBN_FN(runs_shifted_sums)(p, nruns, n, stride, shift, s1, s2, 0, carry,  \
                                           1, ACT);                                     \
        else CBN_FN(runs_shifted_sums)(p, nruns, n, stride, shift, s1, s2, 0, carry, 0,   \
                                       ACT);                                            \
    }
    CBN_ACT_SWITCH(carry->act)
#undef CBN_ACT_STMT_
}

/* Moments of nruns >= 1 runs of n >= 1 values, run j at p + j*stride. One pass sums
   d = x - shift and d*d, the shift being the mean of the first (up to) CBN_L values
   rounded to CBN_T: m2 = S2 - S1^2/n. Where S1^2/n > S2/2 (the shift was off by more than
   about a standard deviation, which costs accuracy) a second pass around the mean found,
   the corrected two-pass formula, gives the result. pf: prefetch the next unit's runs
   during the first pass (inputs larger than the cache). carry: an output pass done
   during the first pass (see runs_shifted_sums), or NULL. */
static inline void CBN_FN(runs_moments)(const CBN_S* p, Py_ssize_t nruns, Py_ssize_t n,
                                        Py_ssize_t stride, double* mean, double* m2,
                                        int pf, const cbn_carry* carry) {
    const Py_ssize_t np = n < CBN_L ? n : CBN_L;
    const double cnt = (double)nruns * n;
    double s = 0.0, ss;
    Py_ssize_t i;
    CBN_T m;
    for (i = 1; i < np; i++) s += CBN_GET(p, i) - CBN_GET(p, 0);
    m = (CBN_T)(CBN_GET(p, 0) + s / np);      /* p[0] exactly on a constant channel */
    if (carry) {
        CBN_FN(runs_shifted_sums_carry)(p, nruns, n, stride, m, &s, &ss, pf && nruns > 1,
                                        carry);
    } else if (pf && nruns > 1) {    /* a constant in each inlined copy of the loop */
        CBN_FN(runs_shifted_sums)(p, nruns, n, stride, m, &s, &ss, 1, NULL, 0, 0);
    } else {
        CBN_FN(runs_shifted_sums)(p, nruns, n, stride, m, &s, &ss, 0, NULL, 0, 0);
    }
    if (s * s / cnt > 0.5 * ss) {    /* far off: a second pass, around the mean */
        m = (CBN_T)(m + s / cnt);
        CBN_FN(runs_shifted_sums)(p, nruns, n, stride, m, &s, &ss, 0, NULL, 0, 0);
    }
    *mean = m + s / cnt;
    ss -= s * s / cnt;
    *m2 = ss < 0.0 ? 0.0 : ss;
}

/* sum(g) and sum(g * (x - mean)) over nruns runs of n values (run j at offset
   j*stride), g first multiplied by the activation's derivative (ACT: at ym, or at
   z = (x - mean) * scale + shift (+ res)). If gr: that g is written there; if dx:
   dx = g * scale. All in one pass. pf: prefetch the next unit's runs of g and x. */
static CBN_INLINE void CBN_FN(runs_sums_body)(const int ACT, const CBN_S* g, const CBN_S* x,
                                              const CBN_S* ym, const CBN_S* res, CBN_S* dx,
                                              CBN_S* gr, Py_ssize_t nruns, Py_ssize_t n,
                                              Py_ssize_t stride, CBN_T mean, CBN_T scale,
                                              CBN_T shift, CBN_T slope, double* sg,
                                              double* sgx, int pf) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    const Py_ssize_t n1 = n - n % CBN_L, n4 = n - n % (4 * CBN_L);
    const V vm = CBN_SPLAT(V, mean), vk = CBN_SPLAT(V, scale), vsh = CBN_SPLAT(V, shift);
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    Py_ssize_t i, j, k, o;
    double s = 0.0, sx = 0.0;
    CBN_T gv, pg[CBN_L], px[CBN_L];
    V tg, tx;
#if CBN_WIDE
    /* without an activation, on runs of CBN_WIDE_RUN values or more: 64-byte
       accumulators, as in runs_shifted_sums (A0 holds a0 and a1, A1 a2 and a3; a tail's
       vector is added to its half, the other half adding +0) */
    typedef CBN_FN(w) W;
    const int wide = ACT == CBN_ACT_NONE && n >= CBN_WIDE_RUN;
    const W wm = CBN_SPLAT(W, mean), wk = CBN_SPLAT(W, scale);
    const V zero = {0};
    W A0 = {0}, A1 = {0}, B0 = {0}, B1 = {0};
    V ta, tb;
#endif
    (void)vsh;
    for (k = 0, o = 0; k < nruns; k++, o += stride) {
#if CBN_WIDE
        if (wide) {
            for (i = 0; i < n4; i += 4 * CBN_L) {
                if (pf) {
                    CBN_PREFETCH_NEXT(g + o + n + i); CBN_PREFETCH_NEXT(x + o + n + i);
                }
                CBN_SUMS_STEP_W(o + i, A0, B0); CBN_SUMS_STEP_W(o + i + 2 * CBN_L, A1, B1);
            }
            for (; i < n1; i += CBN_L) {
                ta = zero; tb = zero;
                CBN_SUMS_STEP(o + i, ta, tb);
                A0 += CBN_FN(wjoin)(ta, zero); B0 += CBN_FN(wjoin)(tb, zero);
            }
        } else
#endif
        {
            for (i = 0; i < n4; i += 4 * CBN_L) {
                if (pf) {
                    CBN_PREFETCH_NEXT(g + o + n + i); CBN_PREFETCH_NEXT(x + o + n + i);
                }
                CBN_SUMS_STEP(o + i, a0, b0); CBN_SUMS_STEP(o + i + CBN_L, a1, b1);
                CBN_SUMS_STEP(o + i + 2 * CBN_L, a2, b2);
                CBN_SUMS_STEP(o + i + 3 * CBN_L, a3, b3);
            }
            for (; i < n1; i += CBN_L) CBN_SUMS_STEP(o + i, a0, b0);
        }
        if (i < n) {            /* the last values, padded with g = 0 */
            if (ACT != CBN_ACT_NONE || gr || dx) {
                for (j = i; j < n; j++) {
                    gv = CBN_DACT_ONE(o + j, CBN_GET(g, o + j));
                    if (gr) CBN_PUT(gr, o + j, gv);
                    if (dx) CBN_PUT(dx, o + j, gv * scale);
                    pg[j - i] = gv;
                }
                for (j = n - i; j < CBN_L; j++) pg[j] = 0;
                CBN_VLOAD(tg, pg);
            } else {
                CBN_PART(tg, (V){0}, g + o + i, n - i, pg);
            }
            CBN_PART(tx, vm, x + o + i, n - i, px);
#if CBN_WIDE
            if (wide) {
                A0 += CBN_FN(wjoin)(zero, tg); B0 += CBN_FN(wjoin)(zero, tg * (tx - vm));
            } else
#endif
            { a1 += tg; b1 += tg * (tx - vm); }
        }
    }
#if CBN_WIDE
    if (wide) {
        CBN_FN(wsplit)(A0, A1, &a0, &a1, &a2, &a3);
        CBN_FN(wsplit)(B0, B1, &b0, &b1, &b2, &b3);
    }
#endif
    a0 = (a0 + a1) + (a2 + a3); b0 = (b0 + b1) + (b2 + b3);
    for (j = 0; j < CBN_L; j++) { s += a0[j]; sx += b0[j]; }
    *sg = s; *sgx = sx;
}

/* One copy of the loop per activation, per combination of the optional outputs (gr, dx)
   and per pf: no tests inside the loop. */
static CBN_NOINLINE void CBN_FN(runs_sums)(const CBN_S* g, const CBN_S* x, const CBN_S* ym,
                                           const CBN_S* res, CBN_S* dx, CBN_S* gr,
                                           Py_ssize_t nruns, Py_ssize_t n,
                                           Py_ssize_t stride, CBN_T mean, CBN_T scale,
                                           CBN_T shift, int act, CBN_T slope, double* sg,
                                           double* sgx, int pf) {
    const int p = pf && nruns > 1;
    _Pragma("GCC diagnostic push")
    _Pragma("GCC diagnostic ignored \"-Wnonnull\"")
#define CBN_SUMS_CASE_(PF, GR, DX)                                                      \
    if (p == PF && (gr != NULL) == GR && (dx != NULL) == DX) {                          \
        CBN_FN(runs_sums_body)(ACT, g, x, ym, res, DX ? dx : NULL, GR ? gr : NULL,      \
                               nruns, n, stride, mean, scale, shift, slope, sg, sgx, PF); \
    }
#define CBN_ACT_STMT_                                                                   \
    CBN_SUMS_CASE_(0, 0, 0) CBN_SUMS_CASE_(0, 0, 1) CBN_SUMS_CASE_(0, 1, 0)             \
    CBN_SUMS_CASE_(0, 1, 1) CBN_SUMS_CASE_(1, 0, 0) CBN_SUMS_CASE_(1, 0, 1)             \
    CBN_SUMS_CASE_(1, 1, 0) CBN_SUMS_CASE_(1, 1, 1)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
#undef CBN_SUMS_CASE_
    _Pragma("GCC diagnostic pop")
}

/* y = act((x - mean) * scale + shift (+ residual)). y may be x itself. stream (a
   constant in each caller): whole cache lines are stored non-temporally, from the first
   line boundary (if y is aligned to its element size; else as without stream), the values
   before and after with ordinary stores (see CBN_TO_ALIGN). */
static CBN_INLINE void CBN_FN(run_affine_body)(const int ACT, const CBN_S* x,
                                               const CBN_S* residual, CBN_S* y, Py_ssize_t n,
                                               CBN_T mean, CBN_T scale, CBN_T shift,
                                               CBN_T slope, int stream) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    const V vmean = CBN_SPLAT(V, mean), vscale = CBN_SPLAT(V, scale);
    const V vshift = CBN_SPLAT(V, shift);
    V x0, x1, r0, r1;
    Py_ssize_t i = 0, nv, head = 0;
    CBN_T v;
    if (stream && ((uintptr_t)y % sizeof(CBN_S)) != 0) stream = 0;   /* cannot align */
    if (stream) {
        head = CBN_TO_ALIGN(y);
        if (head > n) head = n;
        for (; i < head; i++) {
            v = (CBN_GET(x, i) - mean) * scale + shift;
            if (residual) v += CBN_GET(residual, i);
            CBN_PUT(y, i, CBN_ACT_S(ACT, CBN_T, v, slope));
        }
    }
    nv = n - (n - head) % CBN_SLINE;     /* if stream: whole lines before nv */
#if CBN_WIDE
    if (!stream || sizeof(CBN_S) < sizeof(CBN_T)) {
        /* 2 * CBN_L values a step as one 64-byte vector, a zmm register (half the
           instructions of two 32-byte vectors, which in-cache planes are bound by).
           Streamed (whole lines: i starts on one) only for half storage, whose 16 values
           then take one conversion; for float and double two 32-byte stores a line
           measured faster than one 64-byte store. */
        typedef CBN_FN(w) W;
        typedef CBN_FN(wm) IW;
        const W wmean = CBN_SPLAT(W, mean), wscale = CBN_SPLAT(W, scale);
        const W wshift = CBN_SPLAT(W, shift);
        const Py_ssize_t wend = stream ? nv : n - (2 * CBN_L - 1);
        W z, q;
        for (; i < wend; i += 2 * CBN_L) {
            CBN_SLOAD(z, x + i);
            z = (z - wmean) * wscale + wshift;
            if (residual) { CBN_SLOAD(q, residual + i); z += q; }
            CBN_ACT_V(ACT, IW, W, z, slope);
            if (stream) CBN_WSTREAM(y + i, z);
            else CBN_SSTORE(y + i, z);
        }
    }
#endif
    for (; i < nv; i += 2 * CBN_L) {
        CBN_SLOAD(x0, x + i); CBN_SLOAD(x1, x + i + CBN_L);
        x0 = (x0 - vmean) * vscale + vshift; x1 = (x1 - vmean) * vscale + vshift;
        if (residual) {
            CBN_SLOAD(r0, residual + i); CBN_SLOAD(r1, residual + i + CBN_L);
            x0 += r0; x1 += r1;
        }
        CBN_ACT_V(ACT, IV, V, x0, slope); CBN_ACT_V(ACT, IV, V, x1, slope);
        if (stream) {
            CBN_VSTREAM(y + i, x0); CBN_VSTREAM(y + i + CBN_L, x1);
        } else {
            CBN_SSTORE(y + i, x0); CBN_SSTORE(y + i + CBN_L, x1);
        }
    }
    for (; i < n - (n - head) % CBN_L; i += CBN_L) {
        CBN_SLOAD(x0, x + i); x0 = (x0 - vmean) * vscale + vshift;
        if (residual) { CBN_SLOAD(r0, residual + i); x0 += r0; }
        CBN_ACT_V(ACT, IV, V, x0, slope);
        CBN_SSTORE(y + i, x0);
    }
#if CBN_SPART_IO
    /* the last n - i < CBN_L values as one masked vector (a scalar tail of 4 float16
       values cost as much as the 24 vectors before it on K = 196 planes) */
    if (i < n) {
        CBN_SLOAD_N(x0, x + i, n - i); x0 = (x0 - vmean) * vscale + vshift;
        if (residual) { CBN_SLOAD_N(r0, residual + i, n - i); x0 += r0; }
        CBN_ACT_V(ACT, IV, V, x0, slope);
        CBN_SSTORE_N(y + i, x0, n - i);
        i = n;
    }
#endif
    for (; i < n; i++) {
        v = (CBN_GET(x, i) - mean) * scale + shift;
        if (residual) v += CBN_GET(residual, i);
        CBN_PUT(y, i, CBN_ACT_S(ACT, CBN_T, v, slope));
    }
}

static CBN_NOINLINE void CBN_FN(run_affine_edge)(const CBN_S* x, const CBN_S* residual,
                                                 CBN_S* y, Py_ssize_t n, CBN_T mean,
                                                 CBN_T scale, CBN_T shift, int act,
                                                 CBN_T slope) {
#define CBN_ACT_STMT_ CBN_FN(run_affine_body)(ACT, x, residual, y, n, mean, scale, shift, \
                                              slope, 0)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

/* The output pass over nruns >= 1 consecutive runs of n values (run r from x + r * n,
   as a batch entry's planes of consecutive channels are, or one chunk of a plane), run r
   with mean[r], scale[r] and shift[r] (shift NULL: zeros): a batch entry's short planes
   without a call and a dispatch per plane, which they are bound by (16x2048x7x7: 49
   values a run). */
static void CBN_FN(runs_affine)(const CBN_S* x, const CBN_S* residual, CBN_S* y,
                                Py_ssize_t nruns, Py_ssize_t n, const CBN_T* mean,
                                const CBN_T* scale, const CBN_T* shift, int act,
                                CBN_T slope) {
    Py_ssize_t r, o;
#define CBN_ACT_STMT_                                                                   \
    for (r = 0, o = 0; r < nruns; r++, o += n)                                          \
        CBN_FN(run_affine_body)(ACT, x + o, residual ? residual + o : NULL, y + o, n,   \
                                mean[r], scale[r], shift ? shift[r] : 0, slope, 0);
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

static inline void CBN_FN(run_affine_stream)(const CBN_S* x, const CBN_S* residual, CBN_S* y,
                                             Py_ssize_t n, CBN_T mean, CBN_T scale,
                                             CBN_T shift, int act, CBN_T slope) {
#define CBN_ACT_STMT_ CBN_FN(run_affine_body)(ACT, x, residual, y, n, mean, scale, shift, \
                                              slope, 1)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

/* y = (g - gmean - (x - mean) * xcoef) * scale: the training backward's dx; g first
   multiplied by the activation's derivative (at ym, or at z = (x - mean) * scale +
   shift (+ res)). stream: as in run_affine_body. */
static CBN_INLINE void CBN_FN(run_bwd_body)(const int ACT, const CBN_S* x, const CBN_S* g,
                                            const CBN_S* ym, const CBN_S* res, CBN_S* y,
                                            Py_ssize_t n, CBN_T mean, CBN_T scale,
                                            CBN_T shift, CBN_T gmean, CBN_T xcoef,
                                            CBN_T slope, int stream) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    const V vm = CBN_SPLAT(V, mean), vk = CBN_SPLAT(V, scale), vsh = CBN_SPLAT(V, shift);
    const V vgmean = CBN_SPLAT(V, gmean);
    const V vxcoef = CBN_SPLAT(V, xcoef);
    V x0, g0;
    Py_ssize_t i = 0, nv, head = 0;
    CBN_T gv;
    (void)vsh;
    if (stream && ((uintptr_t)y % sizeof(CBN_S)) != 0) stream = 0;   /* cannot align */
    if (stream) {
        head = CBN_TO_ALIGN(y);
        if (head > n) head = n;
        for (; i < head; i++) {
            gv = CBN_DACT_ONE(i, CBN_GET(g, i));
            CBN_PUT(y, i, (gv - gmean - (CBN_GET(x, i) - mean) * xcoef) * scale);
        }
    }
    nv = n - (n - head) % CBN_SLINE;     /* if stream: whole lines before nv */
#if CBN_WIDE
    if (ACT == CBN_ACT_NONE && (!stream || sizeof(CBN_S) < sizeof(CBN_T))) {
        /* one 64-byte vector a step, streamed for half storage only: as in
           run_affine_body */
        typedef CBN_FN(w) W;
        const W wm = CBN_SPLAT(W, mean), wk = CBN_SPLAT(W, scale);
        const W wgmean = CBN_SPLAT(W, gmean), wxcoef = CBN_SPLAT(W, xcoef);
        const Py_ssize_t wend = stream ? nv : n - (2 * CBN_L - 1);
        W z, h;
        for (; i < wend; i += 2 * CBN_L) {
            CBN_SLOAD(z, x + i); CBN_SLOAD(h, g + i);
            z = (h - wgmean - (z - wm) * wxcoef) * wk;
            if (stream) CBN_WSTREAM(y + i, z);
            else CBN_SSTORE(y + i, z);
        }
    }
#endif
    for (; i < n - (n - head) % CBN_L; i += CBN_L) {
        CBN_SLOAD(x0, x + i); CBN_SLOAD(g0, g + i);
        CBN_DACT_STEP(i, g0, x0);
        x0 = (g0 - vgmean - (x0 - vm) * vxcoef) * vk;
        if (stream && i < nv) CBN_VSTREAM(y + i, x0);
        else CBN_SSTORE(y + i, x0);
    }
#if CBN_SPART_IO
    if (ACT == CBN_ACT_NONE && i < n) {     /* as in run_affine_body */
        CBN_SLOAD_N(x0, x + i, n - i); CBN_SLOAD_N(g0, g + i, n - i);
        x0 = (g0 - vgmean - (x0 - vm) * vxcoef) * vk;
        CBN_SSTORE_N(y + i, x0, n - i);
        i = n;
    }
#endif
    for (; i < n; i++) {
        gv = CBN_DACT_ONE(i, CBN_GET(g, i));
        CBN_PUT(y, i, (gv - gmean - (CBN_GET(x, i) - mean) * xcoef) * scale);
    }
}

/* The training backward's dx over nruns >= 1 consecutive runs of n values (as
   runs_affine), run r with mean[r], scale[r], shift[r] (shift NULL: zeros), gmean[r] and
   xcoef[r]. */
static void CBN_FN(runs_bwd)(const CBN_S* x, const CBN_S* g, const CBN_S* ym,
                             const CBN_S* res, CBN_S* y, Py_ssize_t nruns, Py_ssize_t n,
                             const CBN_T* mean, const CBN_T* scale, const CBN_T* shift,
                             const CBN_T* gmean, const CBN_T* xcoef, int act,
                             CBN_T slope) {
    Py_ssize_t r, o;
#define CBN_ACT_STMT_                                                                   \
    for (r = 0, o = 0; r < nruns; r++, o += n)                                          \
        CBN_FN(run_bwd_body)(ACT, x + o, g + o, ym ? ym + o : NULL, res ? res + o : NULL, \
                             y + o, n, mean[r], scale[r], shift ? shift[r] : 0, gmean[r], \
                             xcoef[r], slope, 0);
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

static inline void CBN_FN(run_bwd_stream)(const CBN_S* x, const CBN_S* g, const CBN_S* ym,
                                          const CBN_S* res, CBN_S* y, Py_ssize_t n,
                                          CBN_T mean, CBN_T scale, CBN_T shift,
                                          CBN_T gmean, CBN_T xcoef, int act, CBN_T slope) {
#define CBN_ACT_STMT_ CBN_FN(run_bwd_body)(ACT, x, g, ym, res, y, n, mean, scale, shift, \
                                           gmean, xcoef, slope, 1)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

#undef CBN_PREFETCH_NEXT
#undef CBN_TO_ALIGN
#undef CBN_CARRY_STEP
#undef CBN_SUMS_STEP_W
#undef CBN_CW
#undef CBN_WIDE_RUN
#undef CBN_CV
#undef CBN_CIV
#undef CBN_CSTREAM
#undef CBN_SUMS_STEP
#undef CBN_DACT_STEP
#undef CBN_DACT_ONE
