/* cbn_team.h: how many threads a call gets when the cores are shared.
 *
 * An OpenMP region finishes when its last thread arrives. Where other processes (or a
 * busy thread of this one) compete for the cores, a team thread may not be scheduled for
 * a whole time slice, and the region then waits for it: several processes calling cbn at
 * once on a 2-core machine stalled 40-200 ms in calls that take 0.1 ms alone.
 *
 * So every parallel region is timed: its wall time, and the time its threads spent in
 * work items. When the region ran no faster than that work would have run on one thread
 * (busy / wall below CBN_TEAM_MIN_SPEEDUP) AND its threads lost a scheduling delay's worth
 * of time waiting (wall - busy / nthreads at least CBN_TEAM_MIN_LOST_NS, 250 us: a thread
 * that was not scheduled for part of a time slice), the cores are contended, and the
 * following calls run on one thread (no OpenMP region at all) for a back-off period. A short
 * region on a quiet machine can also run no faster than one thread (waking the team and the
 * join cost a few microseconds, comparable to the work), but it loses far less than that:
 * such a region says nothing, so a quiet process keeps its team (issue 21: 256x1024 never
 * got its second thread, and a probe after a back-off, its threads cold, sent other rows
 * back to one thread). Nor does the first region of a team size: it starts the threads
 * (a process's first 2-thread call sent the next 10 ms of calls to one thread, the median
 * of 40 short calls with them). The back-off is 10 ms, growing
 * fourfold while the parallel regions that probe the cores after it keep stalling, up to
 * 2 s, and halving after each region that ran well (so a quiet machine gets its threads
 * back at the first probe). Results do not depend on the thread count, so this changes
 * only the time.
 * CBN_ADAPTIVE_THREADS=0 (read at import) turns it off.
 *
 * The state is process-wide and touched with relaxed atomics: calls from several Python
 * threads race benignly (the worst outcome is a back-off period started twice).
 */
#ifndef CBN_TEAM_H
#define CBN_TEAM_H

#include <stdint.h>
#include <time.h>

#define CBN_TEAM_MIN_BACKOFF_NS 10000000LL      /* 10 ms */
#define CBN_TEAM_MAX_BACKOFF_NS 2000000000LL    /* 2 s */
#define CBN_TEAM_MIN_SPEEDUP 1.15
#define CBN_TEAM_MIN_WALL_NS 20000LL            /* shorter regions say nothing */
#define CBN_TEAM_MIN_LOST_NS 250000LL           /* per thread: less is not a stall */

static int cbn_team_adaptive = 1;
static int64_t cbn_team_serial_until = 0;       /* monotonic ns */
static int64_t cbn_team_backoff = CBN_TEAM_MIN_BACKOFF_NS;
static int64_t cbn_team_stalls = 0;             /* regions found stalled, ever */
static int cbn_team_started = 1;                /* the largest team reported so far */

static inline int64_t cbn_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* The thread count for a call that asks for `requested`. */
static inline int cbn_team_size(int requested) {
    if (requested <= 1 || !cbn_team_adaptive) return requested;
    if (cbn_now_ns() < __atomic_load_n(&cbn_team_serial_until, __ATOMIC_RELAXED)) return 1;
    return requested;
}

/* What a parallel region of `nthreads` threads took: wall time, and the sum over its
   threads of the time spent in work items. */
static void cbn_team_report(int64_t wall, int64_t busy, int nthreads) {
    int64_t backoff;
    if (nthreads <= 1) return;
    if (nthreads > __atomic_load_n(&cbn_team_started, __ATOMIC_RELAXED)) {
        /* the first region of this many threads created them (OpenMP starts a team's
           threads when a region first asks for them: 300 us and more in the first
           2-thread region of a process): slow once, and no sign of contention */
        __atomic_store_n(&cbn_team_started, nthreads, __ATOMIC_RELAXED);
        return;
    }
    if (wall < CBN_TEAM_MIN_WALL_NS) return;
    backoff = __atomic_load_n(&cbn_team_backoff, __ATOMIC_RELAXED);
    if ((double)busy < CBN_TEAM_MIN_SPEEDUP * (double)wall) {
        /* slow, but by less than a scheduling delay: the overhead of a short region */
        if ((double)wall - (double)busy / nthreads < (double)CBN_TEAM_MIN_LOST_NS) return;
        __atomic_store_n(&cbn_team_serial_until, cbn_now_ns() + backoff, __ATOMIC_RELAXED);
        backoff *= 4;
        if (backoff > CBN_TEAM_MAX_BACKOFF_NS) backoff = CBN_TEAM_MAX_BACKOFF_NS;
        __atomic_fetch_add(&cbn_team_stalls, 1, __ATOMIC_RELAXED);
    } else {
        backoff /= 2;
        if (backoff < CBN_TEAM_MIN_BACKOFF_NS) backoff = CBN_TEAM_MIN_BACKOFF_NS;
    }
    __atomic_store_n(&cbn_team_backoff, backoff, __ATOMIC_RELAXED);
}

#endif /* CBN_TEAM_H */
