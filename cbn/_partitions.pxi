# Included by _kernels.pyx first: per-channel moments and Chan's merge, the fixed
# partitions of the work (planes, rows and the rows' lane parameters), timed teams.

# ------------------------------------------------------------------------------ moments

cdef struct Moments:
    double n        # count
    double mean
    double m2       # sum of squared deviations from the mean


cdef inline void merge(Moments* a, Moments b) noexcept nogil:
    """Chan et al.'s pairwise update: a <- a (+) b."""
    cdef double n, delta
    if b.n == 0:
        return
    if a.n == 0:
        a[0] = b
        return
    n = a.n + b.n
    delta = b.mean - a.mean
    a.mean = a.mean + delta * (b.n / n)
    a.m2 = a.m2 + b.m2 + delta * delta * (a.n * (b.n / n))
    a.n = n


cdef inline double inv_sqrt(double v) noexcept nogil:
    """1/sqrt(v), except 0 for v == 0 (eps = 0 on a constant channel); NaN stays NaN."""
    return 0.0 if v == 0.0 else 1.0 / sqrt(v)


# --------------------------------------------------------------------- work partitions

cdef struct Planes:
    Py_ssize_t M, C, K
    Py_ssize_t mb        # planes of one channel per unit (when planes are short)
    Py_ssize_t nmb       # m-blocks: ceil(M / mb)
    Py_ssize_t nblk      # blocks per plane (when planes are long)
    Py_ssize_t blen      # values per block (the last may be shorter)
    Py_ssize_t units     # nmb * C * nblk, in memory order (m-block, channel, block)
    Py_ssize_t items     # parallel items: contiguous ranges of units
    int pf               # prefetch each unit's successor (set by the caller; no effect
                         # on results)


cdef Planes planes_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                             Py_ssize_t block) noexcept nogil:
    """Units of about `block` values of one channel: a long plane is cut into blocks, short
    planes of one channel are taken mb at a time (runs C*K apart, reduced as one block).
    Units, in memory order, are cut into at most TARGET_ITEMS items. Depends on the shape
    only, never on the thread count."""
    cdef Planes P
    P.M = M
    P.C = C
    P.K = K
    P.nblk = (K + block - 1) // block
    P.blen = (K + P.nblk - 1) // P.nblk
    P.mb = block // K if K < block else 1
    if P.mb > M:
        P.mb = M
    if P.mb < 1:
        P.mb = 1
    P.nmb = (M + P.mb - 1) // P.mb
    P.units = P.nmb * C * P.nblk
    P.items = P.units if P.units < TARGET_ITEMS else TARGET_ITEMS
    P.pf = 0
    return P


cdef inline Py_ssize_t planes_unit(Planes P, Py_ssize_t u, Py_ssize_t* c, Py_ssize_t* nruns,
                                   Py_ssize_t* n) noexcept nogil:
    """Where unit u starts (offset into the (M, C, K) data); sets its channel, its number
    of runs (planes) and the values per run."""
    cdef Py_ssize_t b = u % P.nblk, mblk = u // (P.nblk * P.C), m0, start
    c[0] = (u // P.nblk) % P.C
    m0 = mblk * P.mb
    nruns[0] = P.M - m0 if P.M - m0 < P.mb else P.mb
    start = b * P.blen
    n[0] = P.K - start if P.K - start < P.blen else P.blen
    return (m0 * P.C + c[0]) * P.K + start


cdef struct Rows:
    Py_ssize_t S         # values per m-row: C * K
    Py_ssize_t W         # values per glued row: k * S
    Py_ssize_t k         # m-rows per glued row
    Py_ssize_t nrows     # full glued rows: M // k
    Py_ssize_t tail      # values after the full rows: (M % k) * S
    Py_ssize_t R         # glued rows per block
    Py_ssize_t nblocks
    Py_ssize_t items


cdef inline Py_ssize_t gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    cdef Py_ssize_t r
    while b:
        r = a % b
        a = b
        b = r
    return a


cdef Rows rows_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, Py_ssize_t block,
                         Py_ssize_t max_items, Py_ssize_t itemsize) noexcept nogil:
    cdef Rows P
    cdef Py_ssize_t wl = 64 // itemsize, g
    P.S = C * K
    # Glue k m-rows. Preferred: the widest row of at most ROW_FIXED_VECTORS vectors of 64
    # bytes (the fixed-width loops keep such a row's parameters and accumulators in
    # registers). Else a multiple of ROW_ALIGN values when that stays small (no scalar
    # column tails), and at least ROW_MIN_WIDTH values. The choice depends on the shape
    # and the itemsize only, never on the instruction set, so results do not either.
    g = P.S // gcd(P.S, wl) * wl                  # lcm(S, wl)
    if g <= ROW_FIXED_VECTORS * wl:
        P.k = (ROW_FIXED_VECTORS * wl // g) * g // P.S
    else:
        P.k = ROW_ALIGN // gcd(P.S, ROW_ALIGN)
        if P.k * P.S > 16 * ROW_MIN_WIDTH:
            P.k = 1
        P.k = P.k * ((ROW_MIN_WIDTH + P.k * P.S - 1) // (P.k * P.S))
    P.W = P.k * P.S
    P.nrows = M // P.k
    P.tail = (M % P.k) * P.S
    P.R = block // P.W
    if P.R < ROW_MIN_ROWS:
        P.R = ROW_MIN_ROWS          # per-lane work per block must stay small per value
    P.nblocks = (P.nrows + P.R - 1) // P.R
    P.items = P.nblocks if P.nblocks < max_items else max_items
    return P


cdef void expand_lanes(const floating* v, floating* lane, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t K, Py_ssize_t h=0) noexcept nogil:
    """lane[t] = v[((t + h) // K) % C] for t < W: the lanes of rows that start h values
    into the data (h = 0: at its start). One period (C*K lanes) is filled, the rest
    copied from it."""
    cdef Py_ssize_t t, c = (h // K) % C, kk = h % K, period = C * K
    cdef Py_ssize_t n = W if W < period else period
    for t in range(n):
        lane[t] = v[c]
        kk += 1
        if kk == K:
            kk = 0
            c += 1
            if c == C:
                c = 0
    t = n
    while t < W:
        memcpy(lane + t, lane, (n if W - t > n else W - t) * sizeof(floating))
        t += n


cdef void expand_lanes_d(const double* v, floating* lane, Py_ssize_t W, Py_ssize_t C,
                         Py_ssize_t K) noexcept nogil:
    """lane[t] = v[(t // K) % C] rounded to the data type, for t < W."""
    cdef Py_ssize_t t, c, kk
    for c in range(C):
        for kk in range(K):
            lane[c * K + kk] = <floating>v[c]
    for t in range(C * K, W):
        lane[t] = lane[t - C * K]


# ------------------------------------------------------------------------- timed teams
#
# Every parallel region is timed (wall time, and each thread's time in work items) and
# reported to cbn_team_report, which decides whether the next calls should run on one
# thread because the cores are contended (see cbn/src/cbn_team.h).

cdef struct Team:
    int n
    int64_t t0
    int64_t* busy        # one slot per thread, 8 apart (a cache line); NULL: not timed


cdef inline void team_begin(Team* T, int n) noexcept nogil:
    T.n = n
    T.busy = <int64_t*>calloc(n * 8, sizeof(int64_t))
    T.t0 = cbn_now_ns()


cdef inline void team_add(Team* T, int tid, int64_t t_start) noexcept nogil:
    """Thread tid finished an item it started at t_start."""
    if T.busy != NULL:
        T.busy[8 * tid] += cbn_now_ns() - t_start


cdef inline void team_end(Team* T) noexcept nogil:
    cdef int64_t wall = cbn_now_ns() - T.t0, busy = 0
    cdef int i
    if T.busy == NULL:
        return
    for i in range(T.n):
        busy += T.busy[8 * i]
    free(T.busy)
    cbn_team_report(wall, busy, T.n)
