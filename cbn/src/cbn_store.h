/* cbn_store.h: loads and stores of the data arrays, for one (storage, compute, target).
 *
 * A template, included by cbn_target.h before cbn_planes.h and cbn_rows.h, with their
 * parameters and:
 *   CBN_S       the storage type of the data arrays (x, y, residual, g, ym, dx, gr):
 *               CBN_T itself (f, d), cbn_f16 (h) or cbn_bf16 (b); the h and b
 *               instantiations compute in float (CBN_T float, CBN_L 8), so their loops
 *               are the f loops with converting loads and stores, nothing more
 *   CBN_STORE   0 (CBN_S is CBN_T), 1 (float16) or 2 (bfloat16)
 *
 * The per-lane parameter arrays and accumulators (mean, scale, s1, ...) are always of the
 * compute type CBN_T and use CBN_VLOAD / CBN_VSTORE; the data arrays use these:
 *
 *   CBN_SLOAD(v, p)      v = the vector at p (v of the 32-byte type CBN_FN(v) or of the
 *                        64-byte "wide" type CBN_FN(w) of cbn_rows.h: CBN_L or 2*CBN_L
 *                        values of CBN_T, read from as many stored values)
 *   CBN_SSTORE(p, v)     the converse
 *   CBN_VSTREAM(p, v)    CBN_SSTORE of a 32-byte vector with non-temporal stores, p
 *                        aligned to the stored vector's size (32 bytes, or 16 for half)
 *   CBN_WSTREAM(p, w)    the same for a 64-byte vector (64 bytes, or 32 for half);
 *                        only where CBN_WIDE is 1
 *   CBN_GET(p, i)        the value p[i], as a CBN_T
 *   CBN_PUT(p, i, v)     p[i] = v (v a CBN_T)
 *   CBN_PART(dst, fill, p, cnt, buf)
 *                        dst = the first cnt (< CBN_L) values at p, other lanes from fill
 *                        (buf: a CBN_T[CBN_L] scratch array)
 *   CBN_SLOAD_N(v, p, cnt), CBN_SSTORE_N(p, v, cnt)
 *                        the first cnt (< CBN_L) lanes of a 32-byte vector, the others
 *                        zero / untouched: only where CBN_SPART_IO is 1 (AVX-512 masks);
 *                        CBN_KMASK(cnt) is their mask
 *   CBN_SLINE            stored values per 64-byte cache line
 *
 * Each checks that p points to CBN_S (a compile error otherwise), so that no data array
 * can be read as if it were of the compute type, or the reverse. Conversions: float16
 * with F16C (AVX2 and AVX-512 targets) or exact integer code elsewhere; float -> float16
 * rounds to nearest even (the F16C immediate, not MXCSR), float -> bfloat16 too, by
 * integer arithmetic (no flushing of subnormals). With CBN_S = CBN_T every macro is the
 * memcpy or the array access it replaces: the f and d loops are unchanged.
 */

#undef CBN_SPTR
#undef CBN_SWPTR
#undef CBN_SLOAD
#undef CBN_SSTORE
#undef CBN_VSTREAM
#undef CBN_GET
#undef CBN_PUT
#undef CBN_PART
#undef CBN_SPART_IO
#undef CBN_SLOAD_N
#undef CBN_SSTORE_N
#undef CBN_KMASK
#undef CBN_SLINE
#undef CBN_HX
#undef CBN_NEBF16
#undef CBN_WIDE
#undef CBN_WSTREAM

#define CBN_SPTR(p) CBN_PTR_OF(CBN_S, p)
#define CBN_SWPTR(p) CBN_WPTR_OF(CBN_S, p)
#define CBN_SLINE ((Py_ssize_t)(64 / sizeof(CBN_S)))

typedef CBN_VEC(CBN_T, CBN_L) CBN_FN(v);
typedef CBN_VEC(CBN_IT, CBN_L) CBN_FN(m);
typedef CBN_VEC(CBN_T, 64 / sizeof(CBN_T)) CBN_FN(w);
typedef CBN_VEC(CBN_IT, 64 / sizeof(CBN_T)) CBN_FN(wm);

/* 1 where the 64-byte vectors are registers (AVX-512, 32 of them), so that the loops
   written for them (cbn_planes.h's in-cache element passes and wide reductions,
   cbn_rows.h's fixed-width rows) halve the instructions of two 32-byte vectors. Elsewhere GCC keeps a 64-byte vector on the
   stack: its splats stored lane by lane, its halves joined by a load that waits for two
   stores. Measured with the AVX2 target (CBN_CPU_TARGET=avx2), eval, one thread:
   float32 16x256x14x14 352 us with 64-byte vectors against 260 with 32-byte ones,
   float16 32x64x56x56 6.1 ms against 0.90, bfloat16 5.6 ms against 2.0. So there the
   loops take the 32-byte vectors. */
#if defined(__AVX512F__)
#define CBN_WIDE 1
/* a 64-byte vector's halves, and the converse */
static CBN_INLINE CBN_FN(v) CBN_FN(wlo)(CBN_FN(w) a) {
    return (CBN_FN(v))_mm512_castpd512_pd256((__m512d)a);
}
static CBN_INLINE CBN_FN(v) CBN_FN(whi)(CBN_FN(w) a) {
    return (CBN_FN(v))_mm512_extractf64x4_pd((__m512d)a, 1);
}
static CBN_INLINE CBN_FN(w) CBN_FN(wjoin)(CBN_FN(v) lo, CBN_FN(v) hi) {
    return (CBN_FN(w))_mm512_insertf64x4(_mm512_castpd256_pd512((__m256d)lo),
                                         (__m256d)hi, 1);
}
#else
#define CBN_WIDE 0
#endif

/* the mask of a vector's first cnt lanes (AVX-512) */
#define CBN_KMASK(cnt) ((__mmask8)((1u << (cnt)) - 1))

#if CBN_STORE == 0

#define CBN_SLOAD(v, p) memcpy(&(v), CBN_SPTR(p), sizeof(v))
#define CBN_SSTORE(p, v) memcpy(CBN_SWPTR(p), &(v), sizeof(v))
#define CBN_GET(p, i) (CBN_SPTR(p)[i])
#define CBN_PUT(p, i, v) (CBN_SWPTR(p)[i] = (v))

/* The first cnt (0 < cnt < CBN_L) values at p. On targets with masked moves
   (AVX-512VL: CBN_SPART_IO 1) masked-off lanes never fault, so a run's last partial
   vector is done as the vectors before it:
     CBN_SLOAD_N(v, p, cnt)   loads them (the other lanes zero),
     CBN_SSTORE_N(p, v, cnt)  stores v's first cnt lanes (the memory after them untouched).
   CBN_PART(dst, fill, p, cnt, buf), on every target: dst = those values, the other lanes
   those of fill, the same vector either way; without masks it is assembled in buf (a
   store-to-load forwarding stall, which cost a quarter of the statistics pass on short
   planes such as K = 196). */
#if defined(__AVX512VL__) && CBN_L == 8
#define CBN_SPART_IO 1
#define CBN_SLOAD_N(vec, p, cnt)                                                        \
    ((vec) = (CBN_FN(v))_mm256_maskz_loadu_ps(CBN_KMASK(cnt), CBN_SPTR(p)))
#define CBN_SSTORE_N(p, vec, cnt)                                                       \
    _mm256_mask_storeu_ps(CBN_SWPTR(p), CBN_KMASK(cnt), (__m256)(vec))
#define CBN_PART(dst, fill, p, cnt, buf) ((void)(buf),                                  \
    (dst) = (CBN_FN(v))_mm256_mask_loadu_ps((__m256)(fill), CBN_KMASK(cnt), CBN_SPTR(p)))
#elif defined(__AVX512VL__) && CBN_L == 4
#define CBN_SPART_IO 1
#define CBN_SLOAD_N(vec, p, cnt)                                                        \
    ((vec) = (CBN_FN(v))_mm256_maskz_loadu_pd(CBN_KMASK(cnt), CBN_SPTR(p)))
#define CBN_SSTORE_N(p, vec, cnt)                                                       \
    _mm256_mask_storeu_pd(CBN_SWPTR(p), CBN_KMASK(cnt), (__m256d)(vec))
#define CBN_PART(dst, fill, p, cnt, buf) ((void)(buf),                                  \
    (dst) = (CBN_FN(v))_mm256_mask_loadu_pd((__m256d)(fill), CBN_KMASK(cnt), CBN_SPTR(p)))
#else
#define CBN_SPART_IO 0
#define CBN_PART(dst, fill, p, cnt, buf) do {                                          \
        CBN_VSTORE(buf, fill); memcpy(buf, CBN_SPTR(p), (cnt) * sizeof((buf)[0]));     \
        CBN_VLOAD(dst, buf);                                                             \
    } while (0)
#endif

/* A whole vector stored at p (aligned to the vector's size) with a non-temporal store:
   the line goes to memory without being read first and without taking a place in the
   cache. The stored value is the same as CBN_SSTORE's. Such stores are weakly ordered:
   a pass that uses them ends with cbn_sfence() (cbn_kernels.h) before its results are
   read elsewhere. */
#if defined(__AVX__)
#if CBN_L == 8
#define CBN_VSTREAM(p, v) _mm256_stream_ps(CBN_SWPTR(p), (__m256)(v))
#else
#define CBN_VSTREAM(p, v) _mm256_stream_pd(CBN_SWPTR(p), (__m256d)(v))
#endif
#elif defined(__SSE2__)
#if CBN_L == 8
#define CBN_VSTREAM(p, v) do {                                                          \
        __m128 h_[2]; memcpy(h_, &(v), sizeof(h_));                                     \
        _mm_stream_ps(CBN_SWPTR(p), h_[0]); _mm_stream_ps(CBN_SWPTR(p) + 4, h_[1]);     \
    } while (0)
#else
#define CBN_VSTREAM(p, v) do {                                                          \
        __m128d h_[2]; memcpy(h_, &(v), sizeof(h_));                                    \
        _mm_stream_pd(CBN_SWPTR(p), h_[0]); _mm_stream_pd(CBN_SWPTR(p) + 2, h_[1]);     \
    } while (0)
#endif
#else
#define CBN_VSTREAM(p, v) CBN_SSTORE(p, v)
#endif
#if CBN_WIDE && CBN_L == 8
#define CBN_WSTREAM(p, w) _mm512_stream_ps(CBN_SWPTR(p), (__m512)(w))
#elif CBN_WIDE
#define CBN_WSTREAM(p, w) _mm512_stream_pd(CBN_SWPTR(p), (__m512d)(w))
#endif

#else /* half storage: CBN_T float, CBN_L 8 */

#if CBN_L != 8
#error "half storage computes in float (CBN_L 8)"
#endif

typedef CBN_VEC(uint16_t, 8) CBN_FN(h8);      /* 8 stored values (16 bytes) */
typedef CBN_VEC(uint16_t, 16) CBN_FN(h16);    /* 16 (32 bytes) */
typedef CBN_VEC(uint32_t, 8) CBN_FN(u8);
typedef CBN_VEC(uint32_t, 16) CBN_FN(u16);

#if CBN_STORE == 1 && defined(__F16C__)
/* one vcvtph2ps / vcvtps2ph (round to nearest even by the immediate): the same bits as
   the integer code below, in a tenth of the instructions */
#define CBN_GET(p, i) _cvtsh_ss(CBN_SPTR(p)[i].bits)
#define CBN_PUT(p, i, v) (CBN_SWPTR(p)[i].bits = (uint16_t)_cvtss_sh((float)(v),        \
                                                       _MM_FROUND_TO_NEAREST_INT))
#elif CBN_STORE == 1
#define CBN_GET(p, i) cbn_f16_to_f32(CBN_SPTR(p)[i].bits)
#define CBN_PUT(p, i, v) (CBN_SWPTR(p)[i].bits = cbn_f32_to_f16(v))
#else
#define CBN_GET(p, i) cbn_bf16_to_f32(CBN_SPTR(p)[i].bits)
#define CBN_PUT(p, i, v) (CBN_SWPTR(p)[i].bits = cbn_f32_to_bf16(v))
#endif

/* (The conversions take and give 32- and 64-byte vectors through pointers: by value,
   GCC warns that the base target's ABI for them differs, although they are always
   inlined.) */

/* Without F16C the float16 conversions are out of line (CBN_HX: noinline): inlined in
   every copy of every loop they made the base target's float16 code four times the
   size of its float code, and the build much slower; a call per 8 values costs little
   next to the conversion itself. */
#if CBN_STORE == 1 && !defined(__F16C__)
#define CBN_HX CBN_NOINLINE
#else
#define CBN_HX CBN_INLINE
#endif

/* Stored bits -> float, 8 lanes. */
static CBN_HX void CBN_FN(cvt8)(CBN_FN(v)* o, CBN_FN(h8) h) {
#if CBN_STORE == 1 && defined(__F16C__)
    *o = (CBN_FN(v))_mm256_cvtph_ps((__m128i)h);
#elif CBN_STORE == 1
    /* exact: the exponent rebiased; inf and NaN moved to the top exponent (NaN made
       quiet, as cbn_f16_to_f32); zero and subnormals (exponent 0) as
       (2^-14 + m 2^-24) - 2^-14, all three normal floats */
    typedef CBN_FN(u8) U;
    typedef CBN_FN(m) I;
    const U u = __builtin_convertvector(h, U);
    U r = (u & 0x7fffu) << 13;
    const U e = r & 0x0f800000u;
    const I inf = (I)(e == 0x0f800000u), sub = (I)(e == 0);
    CBN_FN(v) d;
    r += 112u << 23;
    r += (U)(inf & (int32_t)(112u << 23));
    d = (CBN_FN(v))(r + (1u << 23)) - (CBN_FN(v))CBN_SPLAT(U, 113u << 23);
    r = (U)(((I)d & sub) | ((I)r & ~sub));
    r |= (U)((I)((u & 0x7fffu) > 0x7c00u) & 0x400000);
    *o = (CBN_FN(v))(r | ((u & 0x8000u) << 16));
#elif defined(__AVX2__)
    /* (GCC lowers the generic widening to four 4-lane vpmovzxwd and two inserts) */
    *o = (CBN_FN(v))_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#else
    *o = (CBN_FN(v))(__builtin_convertvector(h, CBN_FN(u8)) << 16);
#endif
}

#if CBN_STORE == 2 && defined(__AVX512VL__) && defined(__AVX512BW__)
/* float -> bfloat16 by the integer rounding, with AVX-512: round to nearest even; NaN
   lanes (an unordered compare, into a mask) keep their top bits, made quiet:
   (u >> 16) | 0x40. 8 and 16 lanes. */
static CBN_INLINE CBN_FN(h8) CBN_FN(bf8)(const CBN_FN(v)* v) {
    const __m256i u = (__m256i)*v, hi = _mm256_srli_epi32(u, 16);
    const __mmask8 nan = _mm256_cmp_ps_mask((__m256)*v, (__m256)*v, _CMP_UNORD_Q);
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                 _mm256_and_si256(hi, _mm256_set1_epi32(1)));
    r = _mm256_mask_or_epi32(_mm256_srli_epi32(r, 16), nan, hi, _mm256_set1_epi32(0x40));
    return (CBN_FN(h8))_mm256_cvtepi32_epi16(r);                   /* vpmovdw */
}
static CBN_INLINE CBN_FN(h16) CBN_FN(bf16)(const CBN_FN(w)* v) {
    const __m512i u = (__m512i)*v, hi = _mm512_srli_epi32(u, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask((__m512)*v, (__m512)*v, _CMP_UNORD_Q);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                 _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    r = _mm512_mask_or_epi32(_mm512_srli_epi32(r, 16), nan, hi, _mm512_set1_epi32(0x40));
    return (CBN_FN(h16))_mm512_cvtepi32_epi16(r);                  /* vpmovdw */
}
#endif

/* With AVX512-BF16, vcvtneps2bf16 rounds to nearest even and quiets NaN exactly as the
   integer rounding does (the same bits), except that it reads a subnormal float as
   zero; a vector holding one (vfpclassps, class 0x20: rare, and predicted not taken)
   takes the integer rounding. Normal floats never round to a subnormal bfloat16 (the
   two share float's exponent range), so that is the only difference. */
#if CBN_STORE == 2 && defined(__AVX512BF16__) && defined(__AVX512VL__) \
    && defined(__AVX512DQ__) && defined(__AVX512BW__)
#define CBN_NEBF16 1
#else
#define CBN_NEBF16 0
#endif

/* float -> stored bits, 8 lanes, round to nearest even. */
static CBN_HX CBN_FN(h8) CBN_FN(pack8)(const CBN_FN(v)* v) {
#if CBN_STORE == 1 && defined(__F16C__)
    return (CBN_FN(h8))_mm256_cvtps_ph((__m256)*v, _MM_FROUND_TO_NEAREST_INT);
#elif CBN_STORE == 1
    /* as cbn_f32_to_f16, with the subnormal results from a float addition of 0.5 (whose
       ulp is 2^-24: the sum is rounded to nearest even there, and stays normal) */
    typedef CBN_FN(u8) U;
    typedef CBN_FN(m) I;
    U u = (U)*v;
    const U sign = u & 0x80000000u;
    U nrm, sub, big;
    I isbig, issub;
    u ^= sign;
    nrm = (u - (112u << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    sub = (U)((CBN_FN(v))u + 0.5f) - 0x3f000000u;
    big = 0x7c00u | (U)((I)(u > 0x7f800000u) & (I)(0x200u | ((u >> 13) & 0x3ffu)));
    isbig = (I)(u >= 0x47800000u);
    issub = (I)(u < 0x38800000u);
    nrm = (U)(((I)sub & issub) | ((I)nrm & ~issub));
    nrm = (U)(((I)big & isbig) | ((I)nrm & ~isbig));
    return __builtin_convertvector(nrm | (sign >> 16), CBN_FN(h8));
#elif CBN_NEBF16
    if (__builtin_expect(_mm256_fpclass_ps_mask((__m256)*v, 0x20) == 0, 1))
        return (CBN_FN(h8))_mm256_cvtneps_pbh((__m256)*v);
    return CBN_FN(bf8)(v);
#elif defined(__AVX512VL__) && defined(__AVX512BW__)
    return CBN_FN(bf8)(v);
#elif defined(__AVX2__)
    /* The integer rounding below, written for AVX2: NaN lanes found by an unordered
       compare and given no rounding increment (their top bits kept, | 0x40 makes them
       quiet), where GCC had lowered the generic form's unsigned compare and select to
       five instructions; the same bits, 11 instructions per 8 values for 14 */
    const __m256 f = (__m256)*v;
    const __m256i u = (__m256i)f, hi = _mm256_srli_epi32(u, 16);
    const __m256i nan = (__m256i)_mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    const __m256i inc = _mm256_andnot_si256(
        nan, _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)),
                              _mm256_set1_epi32(0x7fff)));
    const __m256i r = _mm256_or_si256(_mm256_srli_epi32(_mm256_add_epi32(u, inc), 16),
                                      _mm256_and_si256(nan, _mm256_set1_epi32(0x40)));
    return (CBN_FN(h8))_mm_packus_epi32(_mm256_castsi256_si128(r),
                                        _mm256_extracti128_si256(r, 1));
#else
    typedef CBN_FN(u8) U;
    typedef CBN_FN(m) I;
    const U u = (U)*v;
    const I nan = (I)((u & 0x7fffffffu) > 0x7f800000u);
    U r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = (U)(((I)((u >> 16) | 0x40u) & nan) | ((I)r & ~nan));
    return __builtin_convertvector(r, CBN_FN(h8));
#endif
}

/* The same, 16 lanes (the wide vectors of cbn_rows.h). */
static CBN_INLINE void CBN_FN(cvt16)(CBN_FN(w)* o, const CBN_FN(h16)* h) {
#if CBN_STORE == 1 && defined(__AVX512F__)
    *o = (CBN_FN(w))_mm512_cvtph_ps((__m256i)*h);
#elif CBN_STORE == 2 && defined(__AVX512F__)
    *o = (CBN_FN(w))_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)*h), 16);
#else
    CBN_FN(h8) a, b;
    CBN_FN(v) ca, cb;
    memcpy(&a, h, 16); memcpy(&b, (const char*)h + 16, 16);
    CBN_FN(cvt8)(&ca, a); CBN_FN(cvt8)(&cb, b);
    memcpy(o, &ca, 32); memcpy((char*)o + 32, &cb, 32);
#endif
}
static CBN_INLINE void CBN_FN(pack16)(CBN_FN(h16)* o, const CBN_FN(w)* v) {
#if CBN_STORE == 1 && defined(__AVX512F__)
    *o = (CBN_FN(h16))_mm512_cvtps_ph((__m512)*v, _MM_FROUND_TO_NEAREST_INT);
#elif CBN_NEBF16
    if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)*v, 0x20) == 0, 1))
        *o = (CBN_FN(h16))_mm512_cvtneps_pbh((__m512)*v);
    else
        *o = CBN_FN(bf16)(v);
#elif CBN_STORE == 2 && defined(__AVX512VL__) && defined(__AVX512BW__)
    *o = CBN_FN(bf16)(v);
#else
    CBN_FN(v) a, b;
    CBN_FN(h8) pa, pb;
    memcpy(&a, v, 32); memcpy(&b, (const char*)v + 32, 32);
    pa = CBN_FN(pack8)(&a); pb = CBN_FN(pack8)(&b);
    memcpy(o, &pa, 16); memcpy((char*)o + 16, &pb, 16);
#endif
}

static CBN_INLINE void CBN_FN(sld8)(CBN_FN(v)* o, const CBN_S* p) {
    CBN_FN(h8) h;
    memcpy(&h, p, sizeof(h));
    CBN_FN(cvt8)(o, h);
}
static CBN_INLINE void CBN_FN(sld16)(CBN_FN(w)* o, const CBN_S* p) {
    CBN_FN(h16) h;
    memcpy(&h, p, sizeof(h));
    CBN_FN(cvt16)(o, &h);
}
static CBN_INLINE void CBN_FN(sst8)(CBN_S* p, const CBN_FN(v)* v) {
    const CBN_FN(h8) h = CBN_FN(pack8)(v);
    memcpy(p, &h, sizeof(h));
}
static CBN_INLINE void CBN_FN(sst16)(CBN_S* p, const CBN_FN(w)* v) {
    CBN_FN(h16) h;
    CBN_FN(pack16)(&h, v);
    memcpy(p, &h, sizeof(h));
}

/* vec: a variable of either vector type (_Generic picks the width). */
#define CBN_SLOAD(vec, ptr)                                                             \
    _Generic((vec), CBN_FN(v): CBN_FN(sld8), CBN_FN(w): CBN_FN(sld16))(&(vec),           \
                                                                       CBN_SPTR(ptr))
#define CBN_SSTORE(ptr, vec)                                                            \
    _Generic((vec), CBN_FN(v): CBN_FN(sst8), CBN_FN(w): CBN_FN(sst16))(CBN_SWPTR(ptr),   \
                                                                       &(vec))

/* CBN_SLOAD_N, CBN_SSTORE_N, CBN_PART: as for float and double above (the stored values
   converted) */
#if defined(__AVX512VL__) && defined(__AVX512BW__)
#define CBN_SPART_IO 1
#define CBN_SLOAD_N(vec, p, cnt)                                                        \
    CBN_FN(cvt8)(&(vec), (CBN_FN(h8))_mm_maskz_loadu_epi16(CBN_KMASK(cnt), CBN_SPTR(p)))
#define CBN_SSTORE_N(p, vec, cnt)                                                       \
    _mm_mask_storeu_epi16(CBN_SWPTR(p), CBN_KMASK(cnt), (__m128i)CBN_FN(pack8)(&(vec)))
#define CBN_PART(dst, fill, p, cnt, buf) do {                                          \
        CBN_FN(v) c_;                                                                    \
        CBN_SLOAD_N(c_, p, cnt);                                                         \
        (void)(buf);                                                                     \
        (dst) = (CBN_FN(v))_mm256_mask_mov_ps((__m256)(fill), CBN_KMASK(cnt),            \
                                              (__m256)c_);                               \
    } while (0)
#else
#define CBN_SPART_IO 0
#define CBN_PART(dst, fill, p, cnt, buf) do {                                          \
        Py_ssize_t k_;                                                                   \
        CBN_VSTORE(buf, fill);                                                           \
        for (k_ = 0; k_ < (Py_ssize_t)(cnt); k_++) (buf)[k_] = CBN_GET(p, k_);          \
        CBN_VLOAD(dst, buf);                                                             \
    } while (0)
#endif

/* 8 values (16 bytes, p aligned to 16) stored non-temporally: the same bits as
   CBN_SSTORE. */
#if defined(__SSE2__)
#define CBN_VSTREAM(p, v)                                                               \
    _mm_stream_si128((__m128i*)CBN_SWPTR(p), (__m128i)CBN_FN(pack8)(&(v)))
#else
#define CBN_VSTREAM(p, v) CBN_SSTORE(p, v)
#endif
/* 16 values (32 bytes, p aligned to 32), one conversion for both halves: with AVX512-BF16
   the subnormal test and vcvtneps2bf16 are taken once per 16 values, not per 8 */
#if CBN_WIDE
#define CBN_WSTREAM(p, w) do {                                                          \
        CBN_FN(h16) s_;                                                                  \
        CBN_FN(pack16)(&s_, &(w));                                                       \
        _mm256_stream_si256((__m256i*)CBN_SWPTR(p), (__m256i)s_);                        \
    } while (0)
#endif

#endif /* CBN_STORE */
