/* cbn_instance.h: one (dtype, CPU target)'s loops and their table. Included by
 * cbn_target.h after it defines CBN_T, CBN_S, CBN_STORE, CBN_IT, CBN_L, CBN_SUF and
 * CBN_EXP (see cbn_planes.h and cbn_store.h); instantiates the templates with them, then
 * undefines all seven for the next instance. */

#include "cbn_store.h"
#include "cbn_planes.h"
#include "cbn_rows.h"
#include "cbn_ops.h"
#undef CBN_T
#undef CBN_S
#undef CBN_STORE
#undef CBN_IT
#undef CBN_L
#undef CBN_SUF
#undef CBN_EXP
