/* cbn_simd.h: portable explicit-lane vectors for cbn's loops.
 *
 * GCC's vectorizer does not vectorize loop-carried accumulators without -ffast-math, so
 * the hot loops are written with GCC/Clang vector-extension types: a few independent
 * vectors of lanes, combined in a fixed order at the end. Every operation is lane-wise
 * IEEE arithmetic (no FMA contraction: the build passes -ffp-contract=off), so a result
 * is the same whatever instruction set the compiler maps the vectors to (SSE, AVX2,
 * AVX-512). That is what lets cbn compile the loops once per CPU target and pick one at
 * import (cbn_kernels.h) without changing a single bit of any result.
 *
 * This header holds the dtype-independent pieces. The loops themselves are in
 * cbn_planes.h and cbn_rows.h, which are templates: included once per (dtype, target).
 */
#ifndef CBN_SIMD_H
#define CBN_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !(defined(__GNUC__) || defined(__clang__))
#error "cbn's kernels need the vector extensions of GCC or Clang"
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* A vector of N lanes of type T. */
#define CBN_VEC(T, N) T __attribute__((vector_size((N) * sizeof(T))))
/* Unaligned load and store of a whole vector (memcpy compiles to one instruction). */
#define CBN_VLOAD(v, p) memcpy(&(v), (p), sizeof(v))
#define CBN_VSTORE(p, v) memcpy((p), &(v), sizeof(v))
/* Every lane set to the scalar s. */
#define CBN_SPLAT(V, s) ((V){0} + (s))

#define CBN_NOINLINE __attribute__((noinline))
#define CBN_INLINE inline __attribute__((always_inline))
#define CBN_UNROLL _Pragma("GCC unroll 8")

/* ReLU that keeps NaN (zero where x < 0, x itself elsewhere), and ReLU's backward from
   the forward output y (g where y > 0, else 0), both as lane masks; IV is the integer
   vector type of V's shape. */
#define CBN_RELU(IV, V, x) ((V)((IV)(x) & ~(IV)((x) < (V){0})))
#define CBN_MASK(IV, V, g, y) ((V)((IV)(g) & (IV)((y) > (V){0})))

/* Function names of the templates: cbn_<name>_<dtype>_<target>, e.g.
   cbn_runs_moments_f_avx512. */
#define CBN_CAT4_(a, b, c, d) a##_##b##_##c##_##d
#define CBN_CAT4(a, b, c, d) CBN_CAT4_(a, b, c, d)
#define CBN_FN(name) CBN_CAT4(cbn, name, CBN_SUF, CBN_TARGET)

#endif /* CBN_SIMD_H */
