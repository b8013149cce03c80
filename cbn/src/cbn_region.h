/* cbn_region.h: one CPU target beyond the base one, its loops compiled inside its
 * `#pragma GCC target` region. Included with CBN_REGION defined (undefined again here):
 *   1  avx2        (CBN_ISA_AVX2)
 *   2  avx512      (CBN_ISA_AVX512)
 *   3  avx512bf16  (CBN_ISA_AVX512BF16): the bfloat16 loops only, the target's other
 *                  tables being avx512's (cbn_kernels.h)
 * by cbn_kernels.h, all three in the module's translation unit, or, when the build defines
 * CBN_TARGETS_APART, once by each translation unit setup.py compiles apart (a few lines
 * it writes: <Python.h>, cbn_loops.h, CBN_OPS_LINKAGE CBN_HIDDEN, CBN_REGION N, this file).
 * The same code either way. */

#if CBN_REGION == 1
#define CBN_REGION_ISA CBN_ISA_AVX2
#define CBN_TARGET avx2
#elif CBN_REGION == 2
#define CBN_REGION_ISA CBN_ISA_AVX512
#define CBN_TARGET avx512
#elif CBN_REGION == 3
#define CBN_REGION_ISA CBN_ISA_AVX512BF16
#define CBN_TARGET avx512bf16
#define CBN_TARGET_BF16_ONLY
#else
#error "CBN_REGION must be 1 (avx2), 2 (avx512) or 3 (avx512bf16)"
#endif

#pragma GCC push_options
CBN_PRAGMA_TARGET(CBN_REGION_ISA)
#include "cbn_target.h"
#pragma GCC pop_options

#undef CBN_REGION
#undef CBN_REGION_ISA
#undef CBN_TARGET
#undef CBN_TARGET_BF16_ONLY
