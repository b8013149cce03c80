/* cbn_pool.h: a small cache of the large blocks that cbn's outputs live in.
 *
 * Why. A fresh output larger than glibc's mmap threshold (at most 32 MB) is a fresh mmap:
 * every page of it faults on first write, and the kernel zeroes it. On a 51 MB float64
 * array that is 12,545 faults per call (536 with NumPy's huge-page advice), and the
 * normalize pass that writes it costs about 3 copies of the array instead of 1 (see
 * docs/performance.md). A loop that calls cbn with the same shapes frees one such block
 * and maps the next of the same size right after: this cache keeps the freed block and
 * hands it back, already faulted in.
 *
 * How. A NumPy memory handler (PyDataMem_Handler, NEP 49) installed only around the
 * allocation of cbn's own large outputs (cbn/_pool.pxi): the array owns its data as
 * usual, and when NumPy frees it, the block comes back here. Blocks carry a 64-byte
 * header with their capacity (the data starts on a cache line, which the streaming stores
 * want); a block is reused for a request of at least 3/4 of its capacity and no more
 * than it. At most CBN_POOL_SLOTS blocks and cbn_pool_limit bytes are kept (the oldest
 * go first); blocks of 4 MB and more are advised for transparent huge pages as NumPy's
 * own allocator does. Everything else is plain malloc/free. A mutex guards the table
 * (NumPy may free from any thread); a forked child re-initialises it (pthread_atfork).
 *
 * Nothing here runs in a hot loop: one lock per large allocation and per free.
 */
#ifndef CBN_POOL_H
#define CBN_POOL_H

#include <Python.h>
#include <numpy/ndarraytypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CBN_POOL_SLOTS 8
#define CBN_POOL_HEADER 64                      /* bytes before the data: the capacity */
#define CBN_POOL_HUGE ((size_t)4 << 20)          /* advise huge pages from this size on */

typedef struct {
    char* base;            /* what malloc returned (NULL: empty slot) */
    size_t cap;            /* data bytes the block holds */
    uint64_t stamp;        /* when it was put back (a counter) */
} cbn_block;

static struct {
    pthread_mutex_t lock;
    cbn_block slot[CBN_POOL_SLOTS];
    size_t bytes;          /* capacity held in the slots */
    size_t limit;          /* most bytes kept; 0: keep nothing */
    size_t min_size;       /* outputs below this are not pooled (cbn/_pool.pxi decides) */
    uint64_t clock, hits, misses;
} cbn_pool = {PTHREAD_MUTEX_INITIALIZER, {{0}}, 0, (size_t)256 << 20, (size_t)4 << 20, 0, 0,
              0};

/* A new block of `size` data bytes from the system, its header filled; NULL if none. */
static char* cbn_pool_system(size_t size) {
    void* base = NULL;
    if (size > SIZE_MAX - 2 * CBN_POOL_HEADER) return NULL;
    if (posix_memalign(&base, CBN_POOL_HEADER, size + CBN_POOL_HEADER) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    if (size >= CBN_POOL_HUGE) {
        /* the pages wholly inside the block (madvise takes page-aligned ranges) */
        uintptr_t a = ((uintptr_t)base + 4095) & ~(uintptr_t)4095;
        uintptr_t e = ((uintptr_t)base + size + CBN_POOL_HEADER) & ~(uintptr_t)4095;
        if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
    }
#endif
    *(size_t*)base = size;
    return (char*)base + CBN_POOL_HEADER;
}

static void* cbn_pool_malloc(void* ctx, size_t size) {
    int i, best = -1;
    char* p;
    (void)ctx;
    if (size == 0) size = 1;
    pthread_mutex_lock(&cbn_pool.lock);
    for (i = 0; i < CBN_POOL_SLOTS; i++) {
        size_t cap = cbn_pool.slot[i].cap;
        if (cbn_pool.slot[i].base != NULL && cap >= size && size >= cap - cap / 4
                && (best < 0 || cap < cbn_pool.slot[best].cap))
            best = i;
    }
    if (best >= 0) {
        p = cbn_pool.slot[best].base + CBN_POOL_HEADER;
        cbn_pool.bytes -= cbn_pool.slot[best].cap;
        cbn_pool.slot[best].base = NULL;
        cbn_pool.slot[best].cap = 0;
        cbn_pool.hits++;
        pthread_mutex_unlock(&cbn_pool.lock);
        return p;
    }
    cbn_pool.misses++;
    pthread_mutex_unlock(&cbn_pool.lock);
    return cbn_pool_system(size);
}

/* Keep the block at `p` (a data pointer of this handler) if the limits allow, else free
 * it; the oldest kept blocks make room. */
static void cbn_pool_free(void* ctx, void* p, size_t size) {
    char* base;
    size_t cap;
    char* drop[CBN_POOL_SLOTS + 1];
    int ndrop = 0, i, oldest;
    (void)ctx;
    (void)size;            /* the header knows the capacity */
    if (p == NULL) return;
    base = (char*)p - CBN_POOL_HEADER;
    cap = *(size_t*)base;
    pthread_mutex_lock(&cbn_pool.lock);
    if (cap > cbn_pool.limit) {
        drop[ndrop++] = base;
    } else {
        for (;;) {
            int free_slot = -1;
            oldest = -1;
            for (i = 0; i < CBN_POOL_SLOTS; i++) {
                if (cbn_pool.slot[i].base == NULL) {
                    if (free_slot < 0) free_slot = i;
                } else if (oldest < 0 || cbn_pool.slot[i].stamp < cbn_pool.slot[oldest].stamp) {
                    oldest = i;
                }
            }
            if (free_slot >= 0 && cbn_pool.bytes + cap <= cbn_pool.limit) {
                cbn_pool.slot[free_slot].base = base;
                cbn_pool.slot[free_slot].cap = cap;
                cbn_pool.slot[free_slot].stamp = ++cbn_pool.clock;
                cbn_pool.bytes += cap;
                break;
            }
            /* no room: the oldest block goes (there is one: cap <= limit) */
            drop[ndrop++] = cbn_pool.slot[oldest].base;
            cbn_pool.bytes -= cbn_pool.slot[oldest].cap;
            cbn_pool.slot[oldest].base = NULL;
            cbn_pool.slot[oldest].cap = 0;
        }
    }
    pthread_mutex_unlock(&cbn_pool.lock);
    for (i = 0; i < ndrop; i++) free(drop[i]);
}

static void* cbn_pool_calloc(void* ctx, size_t n, size_t elsize) {
    void* p;
    if (elsize != 0 && n > SIZE_MAX / elsize) return NULL;
    p = cbn_pool_malloc(ctx, n * elsize);
    if (p != NULL) memset(p, 0, n * elsize);
    return p;
}

static void* cbn_pool_realloc(void* ctx, void* p, size_t size) {
    void* q;
    size_t cap;
    if (p == NULL) return cbn_pool_malloc(ctx, size);
    cap = *(size_t*)((char*)p - CBN_POOL_HEADER);
    if (size <= cap && size >= cap / 2) return p;
    q = cbn_pool_malloc(ctx, size);
    if (q == NULL) return NULL;
    memcpy(q, p, cap < size ? cap : size);
    cbn_pool_free(ctx, p, cap);
    return q;
}

static PyDataMem_Handler cbn_pool_handler = {
    "cbn_output_pool", 1,
    {NULL, cbn_pool_malloc, cbn_pool_calloc, cbn_pool_realloc, cbn_pool_free}};

/* Free every kept block and keep at most `limit` bytes from now on. */
static void cbn_pool_set_limit(size_t limit) {
    char* drop[CBN_POOL_SLOTS];
    int ndrop = 0, i;
    pthread_mutex_lock(&cbn_pool.lock);
    cbn_pool.limit = limit;
    for (i = 0; i < CBN_POOL_SLOTS; i++) {
        if (cbn_pool.slot[i].base != NULL) {
            drop[ndrop++] = cbn_pool.slot[i].base;
            cbn_pool.slot[i].base = NULL;
            cbn_pool.slot[i].cap = 0;
        }
    }
    cbn_pool.bytes = 0;
    pthread_mutex_unlock(&cbn_pool.lock);
    for (i = 0; i < ndrop; i++) free(drop[i]);
}

static void cbn_pool_after_fork_child(void) {
    pthread_mutex_init(&cbn_pool.lock, NULL);
}

static int cbn_pool_init(void) {
    return pthread_atfork(NULL, NULL, cbn_pool_after_fork_child);
}

#endif
