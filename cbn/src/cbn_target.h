/* cbn_target.h: every loop of one CPU target, for float, double, float16 and bfloat16
 * storage. A template, included by cbn_kernels.h once per target with CBN_TARGET
 * defined (and, for the non-base targets, inside a `#pragma GCC target` region that
 * enables the ISA). float16 (h) and bfloat16 (b) data are computed in float: the f loops
 * with converting loads and stores (cbn_store.h). Each block of defines is one instance
 * (cbn_instance.h, which undefines them). The base target is compiled in the module's
 * translation unit; avx2 and avx512 are too (cbn_kernels.h), or each in a translation
 * unit of its own (cbn_region.h) when the build defines CBN_TARGETS_APART.
 * With CBN_TARGET_BF16_ONLY defined, only the bfloat16 instance (the avx512bf16 target,
 * whose other tables are avx512's). */

#ifndef CBN_TARGET_BF16_ONLY   /* (the avx512bf16 target: bfloat16 loops only) */
#define CBN_T float
#define CBN_S float
#define CBN_STORE 0
#define CBN_IT int32_t
#define CBN_L 8
#define CBN_SUF f
#define CBN_EXP expf
#include "cbn_instance.h"

#define CBN_T double
#define CBN_S double
#define CBN_STORE 0
#define CBN_IT int64_t
#define CBN_L 4
#define CBN_SUF d
#define CBN_EXP exp
#include "cbn_instance.h"

#define CBN_T float
#define CBN_S cbn_f16
#define CBN_STORE 1
#define CBN_IT int32_t
#define CBN_L 8
#define CBN_SUF h
#define CBN_EXP expf
#include "cbn_instance.h"

#endif

#define CBN_T float
#define CBN_S cbn_bf16
#define CBN_STORE 2
#define CBN_IT int32_t
#define CBN_L 8
#define CBN_SUF b
#define CBN_EXP expf
#include "cbn_instance.h"
