/* cbn.h: cbn's C ABI, for C, C++, Cython, numba and ctypes callers.
 *
 * What it is. The kernel core's entries (cbn_core.h: one per operation and stage, over a
 * plain descriptor and typed arguments), reached through one table of function pointers
 * that the installed module exports as a PyCapsule, "cbn._kernels._C_API" (as NumPy
 * exports its C API): nothing of the module is in the global symbol namespace, and no
 * link-time dependency on it exists. The entries run without the GIL, from any thread,
 * concurrently; they never call into Python.
 *
 * Getting the table:
 *   - a Python extension (C, C++): `const cbn_api* api = cbn_import();` after
 *     Py_Initialize, with the GIL held (once, e.g. in the module's init), then
 *     `api->forward(&desc, &args)` from any thread;
 *   - Cython: `from cbn.capi cimport ...` (cbn/capi.pxd) and `import_cbn()`;
 *   - ctypes, cffi, numba: `cbn.capi()` returns the capsule and the address of each entry
 *     (see cbn._kernels.capi).
 * `cbn.get_include()` is this folder.
 *
 * Calling an entry. Fill a cbn_desc (version CBN_DESC_VERSION; storage and compute dtype;
 * the (M, C, K) view of the data with its element strides, which `api->view` derives from
 * an N-d array's shape, byte strides and channel axis; the thread count; optionally a
 * message buffer) and the operation's arguments struct (cbn_core.h documents each
 * field), and call. The entry checks its arguments as cbn's Python functions do and
 * returns CBN_OK, or an error code with the message, worded as the Python API words it,
 * written into desc.msg; nothing is written but the message when an entry fails.
 *
 * Versions. CBN_ABI_VERSION changes when the table or a struct changes incompatibly;
 * the table's `abi_version` says which one the installed module implements, and `size`
 * how many bytes of the table it fills (fields are only ever appended).
 */
#ifndef CBN_H
#define CBN_H

#include <stdint.h>
#include "cbn_core.h"

#define CBN_ABI_VERSION 1
#define CBN_CAPSULE_NAME "cbn._kernels._C_API"

typedef struct cbn_api {
    int32_t abi_version;        /* CBN_ABI_VERSION of the installed module */
    int32_t size;               /* sizeof(cbn_api) as the module was built */
    const char* version;        /* cbn.__version__ */

    /* desc's view of an array: shape and strides (in bytes) of `ndim` axes, the channel
       axis (negative counts from the end), the itemsize of desc->storage. The array must
       be one dense block in some order of its axes with positive strides (every
       C-contiguous, Fortran or channels-last array is); M is the product of the axes
       before the channel axis in memory order, K of those after it. Writes M, C, K and
       the element strides; CBN_ERR_ARG (and the message) for other arrays. */
    int32_t (*view)(cbn_desc* desc, int32_t ndim, const int64_t* shape,
                    const int64_t* strides, int32_t axis);

    int32_t (*forward)(const cbn_desc* desc, const cbn_forward_args* args);
    int32_t (*normalize)(const cbn_desc* desc, const cbn_normalize_args* args);
    int32_t (*eval_params)(const cbn_desc* desc, const cbn_eval_params_args* args);
    int32_t (*backward)(const cbn_desc* desc, const cbn_backward_args* args);
    int32_t (*moments)(const cbn_desc* desc, const cbn_moments_args* args);
    int32_t (*finish)(const cbn_desc* desc, const cbn_finish_args* args);
    int32_t (*backward_reduce)(const cbn_desc* desc, const cbn_reduce_args* args);
    int32_t (*backward_elements)(const cbn_desc* desc, const cbn_elements_args* args);

    /* "ok", "invalid argument", "unsupported dtype", "out of memory" (NULL: unknown) */
    const char* (*status_name)(int32_t status);
} cbn_api;

#ifdef Py_PYTHON_H
/* The table, from the installed module; NULL with a Python exception set if cbn is not
   importable or implements another ABI version. Call with the GIL held. */
static inline const cbn_api* cbn_import(void) {
    const cbn_api* api = (const cbn_api*)PyCapsule_Import(CBN_CAPSULE_NAME, 0);
    if (api != NULL && api->abi_version != CBN_ABI_VERSION) {
        PyErr_Format(PyExc_ImportError,
                     "cbn implements C ABI version %d, this code was built for %d",
                     (int)api->abi_version, CBN_ABI_VERSION);
        return NULL;
    }
    return api;
}
#endif

#endif /* CBN_H */
