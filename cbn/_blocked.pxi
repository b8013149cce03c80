# Included by _kernels.pyx: channel-blocked training passes for planes layouts.
#
# The two-pass training forward reads x from memory twice (statistics over the whole
# array, then the output pass), the backward x and dy twice. For planes layouts (K >=
# PLANE_MIN_K) the channels are independent, so a group of channels can be reduced, its
# per-channel parameters finished, and its output written while its values are still in
# the last-level cache: one read from memory instead of two.
#
# Bit for bit the same results. A group computes each of its channels' moments (sums)
# from the same units of planes_partition, in the same order and merged in the same tree:
# the units of one item merged into a partial, the partials merged in item order (see
# planes_moments, planes_sums). The finish and the element passes are per channel and per
# element, so the traversal order does not matter to them. A channel belongs to one group
# and a group to one thread, so the results do not depend on the grouping or on the
# thread count either.
#
# Traversal: batch index outermost, so that each step reads a contiguous run of g*K values
# (g channels' planes of one batch entry); one channel at a time (M strided runs per
# channel) defeats the prefetchers. Groups (or, chained, chains of consecutive groups)
# are parallel work items (dynamic schedule); one group is reduced and written by one
# thread.
#
# When: training, planes layout, and the input large enough that the second read would
# come from memory (see block_channels); the group holds as many channels as fit a share
# of the last-level cache (cbn/src/cbn_cache.h).
#
# On one thread, reduce-then-write per group gains little: the core reads memory while
# it reduces a group and writes memory while it writes one, never both at once, so the
# forward costs about 1.4 copies of the array. The chained forward (forward_chain, for
# long planes) reduces each group in the loop that writes the previous group's output
# (cbn_carry: the reduction's loop carries the output pass), so reads and writes overlap
# as in a copy: 1.0 to 1.25 copies on the 20-30 MB cases on one thread, 0.9 to 1.0 on
# two (chains of groups as the parallel items). The same chain for the backward (two
# arrays reduced while dx is written) measured slower than reduce-then-write, and is
# not built.
#
# Also here, for the same large inputs, blocked or not: non-temporal stores in the planes
# output passes (stream_flag) and prefetching in the planes reductions (prefetch_flag).
# Measured on the project's 2-core machine (docs/performance.md): on two threads
# blocking pays on every large case. "Large" means larger than the running threads'
# level-2 caches, in groups of half an L2 (see group_budget): a large server L3 is read
# by one core at about the speed of memory.

cdef enum:
    BLOCKING_OFF = 0      # always two passes
    BLOCKING_AUTO = 1     # blocked where it pays (block_channels)
    BLOCKING_FORCE = 2    # blocked wherever the layout allows (tests)

cdef int blocking_mode = BLOCKING_AUTO
cdef long long blocking_budget = 0      # bytes per group; 0: from the cache size
cdef int blocking_stream = OP_STREAM    # non-temporal stores for large outputs (or 0)
cdef int chain_mode = 1                 # forwards over long planes as chains (or 0)


# The blocked passes count the caches as a core reads them fast (see cbn/src/cbn_cache.h):
# the last level as LLC_CAP bytes at most, and groups at most half the level-2 cache.
# (Half storage, too, since its blocked passes take 64-byte vectors on AVX-512: before,
# its two passes had measured as fast as L2-sized groups.)
cdef enum:
    LLC_CAP = 16 << 20


cdef inline long long llc_bytes(bint blocked) noexcept nogil:
    """The last-level cache's bytes, as the planes passes count them (blocked: a
    channel-blocked pass, at most LLC_CAP; the two-pass path counts the cache as read, its
    output then left in a large L3 for whatever reads it next: measured, streaming the
    eval output of 16x1024x14x14 float32 (12.8 MB) cost 12-33%)."""
    if blocked and cbn_cache_size > LLC_CAP:
        return LLC_CAP
    return cbn_cache_size


cdef long long group_budget(int nthreads) noexcept nogil:
    """Bytes of input a group may hold: half of each running thread's share of the
    last-level cache (the other half holds the output lines written meanwhile and
    whatever else runs), and at most half of the level-2 cache."""
    cdef int share = nthreads if nthreads < cbn_cache_sharing else cbn_cache_sharing
    cdef long long budget
    if blocking_budget > 0:
        return blocking_budget
    if share < 1:
        share = 1
    budget = cbn_cache_size // (2 * share)
    if cbn_l2_size > 0 and cbn_l2_size // 2 < budget:
        budget = cbn_l2_size // 2
    return budget


cdef long long cache_held(int nthreads) noexcept nogil:
    """Bytes that a pass's second read finds in cache: the last level, or the running
    threads' level-2 caches together where that is less."""
    cdef long long held = cbn_cache_size
    if cbn_l2_size > 0 and nthreads * cbn_l2_size < held:
        held = nthreads * cbn_l2_size
    return held


cdef inline int stream_flag(Py_ssize_t nvalues, Py_ssize_t itemsize,
                            bint blocked) noexcept nogil:
    """OP_STREAM for a planes output pass writing nvalues values of itemsize bytes
    (blocked: in a channel-blocked pass), where non-temporal stores pay: where the output
    and the input it is computed from (as large) do not fit the last-level cache together
    (llc_bytes), so the output's lines would be evicted before they are read again (the
    stores then skip reading them first). 0 elsewhere."""
    if blocking_stream == 0:
        return 0
    if (blocking_mode == BLOCKING_FORCE
            or 2 * <long long>nvalues * itemsize > llc_bytes(blocked)):
        return OP_STREAM
    return 0


cdef inline int prefetch_flag(long long nvalues, Py_ssize_t itemsize,
                              bint blocked) noexcept nogil:
    """1 where a planes reduction reading nvalues values of itemsize bytes (blocked: in a
    channel-blocked pass) prefetches each unit's successor: more than half the last-level
    cache (llc_bytes) read (short planes, such as 64x128x28x28's 784 values,
    are taken mb at a time, runs C*K apart; each run is over before the hardware
    prefetcher has caught its stream: measured, the statistics pass of that float32 case
    went from 1.1 to 0.55 copies). Not below: in-cache inputs measured up to 16% slower
    with the prefetches."""
    if blocking_mode == BLOCKING_FORCE or 2 * nvalues * itemsize > llc_bytes(blocked):
        return 1
    return 0


cdef enum:
    BLOCK_MIN_K = 128       # shorter planes take the two passes (blocked, 16x2048x7x7's
                            # 49-value planes measured 20-40% slower; 196: 5-10% faster)
    CHAINS_PER_THREAD = 2   # chains per thread of a parallel chained forward (dynamic
                            # schedule: a thread whose core is taken away for a time
                            # slice leaves its second chain to the others)


cdef inline bint chained(Py_ssize_t K, bint forward) noexcept nogil:
    """Whether a blocked training pass runs as chains (forward_chain): the forward, over
    planes of one unit per batch entry (planes_partition's mb == 1: K > BLOCK / 2); on
    one thread one chain, on several CHAINS_PER_THREAD per thread. Shorter planes are
    reduced several batch entries at a time, and carrying their output measured slower
    than reduce-then-write (64x128x28x28, one thread: 1.48 against 1.25 copies in
    float32, 1.97 against 1.52 in float64)."""
    return forward and chain_mode != 0 and 2 * K > BLOCK


cdef Py_ssize_t block_channels(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                               Py_ssize_t itemsize, int narrays, int nthreads,
                               bint forward=False) noexcept nogil:
    """Channels per group of a channel-blocked training pass reading narrays arrays of
    the (M, C, K) shape (forward: the training forward's), or 0 where the two-pass path
    is to run: rows layouts; inputs whose arrays fit the cache (their second read is from
    cache already, and small inputs must not pay for the group bookkeeping); a channel
    larger than a group's budget; fewer groups than threads, or a split that leaves
    threads idle for more than an eighth of the call (3 groups on 2 threads measured
    slower than two passes). ("Fit": what the pass reads and writes together.)

    A chain (see chained) holds two groups in the cache at once, the one being reduced
    and the one being written: half the budget each, or a group of one channel where a
    channel fits the budget but not half of it. On several threads the parallel items
    are then chains of groups, CHAINS_PER_THREAD per thread."""
    cdef long long per_channel = <long long>M * K * itemsize * narrays
    cdef long long budget = group_budget(nthreads)
    cdef bint chain = chained(K, forward)
    cdef Py_ssize_t g, ngroups, rounds, per_round = nthreads
    if blocking_mode == BLOCKING_OFF or K < PLANE_MIN_K or C < 1 or M * K == 0:
        return 0
    if blocking_mode == BLOCKING_AUTO and K < BLOCK_MIN_K:
        return 0
    g = <Py_ssize_t>(budget // per_channel) if per_channel > 0 else C
    if g >= 1 and chain:
        g = <Py_ssize_t>(budget // (2 * per_channel)) if per_channel > 0 else C
        if g < 1:
            g = 1
    if blocking_mode == BLOCKING_FORCE:
        if g < 1:
            g = 1
    else:
        if g < 1 or ((per_channel + <long long>M * K * itemsize) * C
                     <= cache_held(nthreads)):
            return 0
    if g > C:
        g = C
    ngroups = (C + g - 1) // g
    if nthreads > 1:
        # as many groups as possible in whole rounds of the team's items (groups, or
        # chains of groups)
        if chain:
            per_round = nthreads * CHAINS_PER_THREAD
        rounds = (ngroups + per_round - 1) // per_round
        if rounds * per_round <= C:
            ngroups = rounds * per_round
        if blocking_mode != BLOCKING_FORCE:
            if ngroups < nthreads or 8 * ngroups < 7 * rounds * per_round:
                return 0
    return (C + ngroups - 1) // ngroups


cdef inline Py_ssize_t unit_item(Planes P, Py_ssize_t u) noexcept nogil:
    """The item of planes_partition's unit u: u0(it) <= u < u0(it + 1), with
    u0(it) = it * units // items."""
    return ((u + 1) * P.items - 1) // P.units


# A group's reduction walks the m-blocks of planes_partition in order (step j: the units
# of m-block j, channel by channel), so each channel's units are taken in unit order and
# merged as planes_moments / planes_sums merge them: into a partial per item, the
# partials in item order.

cdef void moments_begin(Py_ssize_t c0, Py_ssize_t c1, Moments* out, Moments* part,
                        Py_ssize_t* cur) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        zero_moments(&out[c], 1)
        zero_moments(&part[c], 1)
        cur[c] = -1


cdef void moments_step(const storage* x, Planes P, Py_ssize_t mblk, Py_ssize_t c0,
                       Py_ssize_t c1, Moments* out, Moments* part, Py_ssize_t* cur,
                       const cbn_forward_args* k, Py_ssize_t back, const floating* scale,
                       const floating* shift) noexcept nogil:
    """Step mblk of the reduction of channels c0..c1. If k is not NULL, the same loop
    writes the forward's output of the same units back channels earlier (channel c's unit
    carries channel c - back's; see cbn_carry): the previous group's."""
    cdef Py_ssize_t c, b, u, it, off, cc, nruns, n, poff
    cdef cbn_carry a
    cdef const cbn_carry* carry = &a if k != NULL else NULL
    cdef Moments m
    if k != NULL:
        a.act = k.act.kind
        a.slope = k.act.negative_slope
    for c in range(c0, c1):
        if k != NULL:
            a.mean = (<const floating*>k.save_mean)[c - back]
            a.scale = scale[c - back]
            a.shift = shift[c - back]
        for b in range(P.nblk):
            u = (mblk * P.C + c) * P.nblk + b
            it = unit_item(P, u)
            if it != cur[c]:
                merge(&out[c], part[c])
                zero_moments(&part[c], 1)
                cur[c] = it
            off = planes_unit(P, u, &cc, &nruns, &n)
            if k != NULL:
                poff = off - back * P.K
                a.x = x + poff
                a.residual = shifted(<const storage*>k.residual, poff)
                a.y = <storage*>k.y + poff
            m.n = <double>nruns * n
            ops(x).runs_moments(x + off, nruns, n, P.C * P.K, &m.mean, &m.m2, P.pf, carry)
            merge(&part[c], m)


cdef void moments_end(Py_ssize_t c0, Py_ssize_t c1, Moments* out,
                      Moments* part) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        merge(&out[c], part[c])


cdef void sums_begin(Py_ssize_t c0, Py_ssize_t c1, Sums* out, Sums* part,
                     Py_ssize_t* cur) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        zero_sums(&out[c], 1)
        zero_sums(&part[c], 1)
        cur[c] = -1


cdef void sums_step(const storage* g, const storage* x, const Dact* da, storage* gr,
                    Planes P, Py_ssize_t mblk, Py_ssize_t c0, Py_ssize_t c1,
                    const floating* mean, const floating* scale, Sums* out, Sums* part,
                    Py_ssize_t* cur) noexcept nogil:
    """(dy times the activation's derivative written to gr if not NULL)"""
    cdef Py_ssize_t c, b, u, it, off, cc, nruns, n
    cdef double sg, sgx
    for c in range(c0, c1):
        for b in range(P.nblk):
            u = (mblk * P.C + c) * P.nblk + b
            it = unit_item(P, u)
            if it != cur[c]:
                out[c].g += part[c].g
                out[c].gx += part[c].gx
                zero_sums(&part[c], 1)
                cur[c] = it
            off = planes_unit(P, u, &cc, &nruns, &n)
            ops(g).runs_sums(g + off, x + off, shifted(<const storage*>da.ym, off),
                             shifted(<const storage*>da.res, off), NULL,
                             <storage*>shifted(gr, off), nruns, n, P.C * P.K, mean[c],
                             scale[c],
                             (<const floating*>da.shift)[c] if da.shift != NULL else 0,
                             da.act, da.slope, &sg, &sgx, P.pf)
            part[c].g += sg
            part[c].gx += sgx


cdef void sums_end(Py_ssize_t c0, Py_ssize_t c1, Sums* out, Sums* part) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        out[c].g += part[c].g
        out[c].gx += part[c].gx


cdef void rows_of_group(const Pass* p, Py_ssize_t m0, Py_ssize_t m1, Py_ssize_t C,
                        Py_ssize_t K, Py_ssize_t c0, Py_ssize_t c1,
                        const storage* tag) noexcept nogil:
    """planes_apply's element pass over batch entries m0..m1 of channels c0..c1 (the same
    units, so the same calls of the same loop on the same values)."""
    cdef Py_ssize_t nch = (K + CHUNK - 1) // CHUNK
    cdef Py_ssize_t clen = (K + nch - 1) // nch
    cdef Py_ssize_t m
    for m in range(m0, m1):
        planes_apply_units(p, C, K, nch, clen, (m * C + c0) * nch, (m * C + c1) * nch, tag)


cdef inline Py_ssize_t group_end(Py_ssize_t grp, Py_ssize_t gsize,
                                 Py_ssize_t C) noexcept nogil:
    """One past the last channel of group grp (which starts at grp * gsize). The channel
    range is assigned in the loop body, never through a pointer: Cython makes a prange
    variable private only when the body assigns it (through &c0 both threads shared one
    c0/c1, and a group could run another's channels)."""
    return (grp + 1) * gsize if (grp + 1) * gsize < C else C


cdef void forward_finish(const cbn_desc* d, const cbn_forward_args* k, Py_ssize_t c0,
                         Py_ssize_t c1, const Moments* mom, const floating* tag,
                         floating* scale, floating* shift) noexcept nogil:
    """stage_finish for channels c0..c1 (tag: the dtype)."""
    stage_finish(mom + c0, c1 - c0, <double>d.M * d.K, shifted(<floating*>k.weight, c0),
                 shifted(<floating*>k.bias, c0),
                 <floating*>shifted(<floating*>k.running_mean, c0),
                 <floating*>shifted(<floating*>k.running_var, c0), k.momentum, k.eps,
                 <floating*>k.save_mean + c0, <floating*>k.save_invstd + c0, scale + c0,
                 shift + c0)


cdef void forward_group(const storage* x, const cbn_desc* d, const cbn_forward_args* k,
                        Planes P, Py_ssize_t c0, Py_ssize_t c1, Moments* mom,
                        Moments* part, Py_ssize_t* cur, floating* scale,
                        floating* shift, int stream) noexcept nogil:
    """Statistics, finish and output of channels c0..c1 (see forward_t's stages)."""
    cdef Py_ssize_t j
    moments_begin(c0, c1, mom, part, cur)
    for j in range(P.nmb):
        moments_step(x, P, j, c0, c1, mom, part, cur, NULL, 0, <const floating*>NULL,
                     <const floating*>NULL)
    moments_end(c0, c1, mom, part)
    forward_finish(d, k, c0, c1, mom, scale, scale, shift)
    cdef Pass out = affine_pass(OP_AFFINE | stream, &k.act, x, k.residual, k.y,
                                k.save_mean, scale, shift)
    rows_of_group(&out, 0, d.M, d.C, d.K, c0, c1, x)
    if stream:
        cbn_sfence()


cdef void forward_chain(const storage* x, const cbn_desc* d, const cbn_forward_args* k,
                        Planes P, Py_ssize_t gsize,
                        Py_ssize_t g0, Py_ssize_t g1, Moments* mom, Moments* part,
                        Py_ssize_t* cur, floating* scale, floating* shift,
                        int stream) noexcept nogil:
    """Groups g0..g1 in order on the calling thread, each group's statistics taken in the
    loop that writes the previous group's output (a0..a1: the channels whose output is
    pending). One core then reads memory (the group reduced) while it writes (the group
    before), as a copy does; reduce-then-write per group leaves the bus idle one way at a
    time."""
    cdef Py_ssize_t grp, j, c0, c1, a0 = 0, a1 = 0
    cdef const cbn_forward_args* carry
    cdef Pass out = affine_pass(OP_AFFINE | stream, &k.act, x, k.residual, k.y,
                                k.save_mean, scale, shift)
    for grp in range(g0, g1):
        c0 = grp * gsize
        c1 = group_end(grp, gsize, d.C)
        carry = k if a1 > a0 else NULL
        moments_begin(c0, c1, mom, part, cur)
        for j in range(P.nmb):
            moments_step(x, P, j, c0, c1, mom, part, cur, carry, c0 - a0, scale, shift)
        moments_end(c0, c1, mom, part)
        forward_finish(d, k, c0, c1, mom, scale, scale, shift)
        if carry != NULL and a0 + (c1 - c0) < a1:    # pending channels not carried
            rows_of_group(&out, 0, d.M, d.C, d.K, a0 + (c1 - c0), a1, x)
        a0 = c0
        a1 = c1
    rows_of_group(&out, 0, d.M, d.C, d.K, a0, a1, x)
    if stream:
        cbn_sfence()


cdef void blocked_forward(const storage* x, const cbn_desc* d, const cbn_forward_args* k,
                          Py_ssize_t gsize, Moments* mom, Moments* part, Py_ssize_t* cur,
                          floating* scale, floating* shift) noexcept nogil:
    """The training forward, groups of gsize channels as parallel work items."""
    cdef Planes P = planes_partition(d.M, d.C, d.K, BLOCK)
    cdef Py_ssize_t ngroups = (d.C + gsize - 1) // gsize, grp, c0, c1
    cdef int stream = stream_flag(d.M * d.C * d.K, sizeof(storage), True)
    cdef Team T
    cdef int64_t t_item
    cdef int nthreads = d.nthreads
    P.pf = prefetch_flag(d.M * d.C * d.K, sizeof(storage), True)
    cdef bint chain = (chained(d.K, True) and stream != 0
                       and <size_t>k.y % sizeof(storage) == 0)
    cdef Py_ssize_t nch = nthreads * CHAINS_PER_THREAD
    if nthreads == 1:
        if chain:
            forward_chain(x, d, k, P, gsize, 0, ngroups, mom, part, cur, scale, shift,
                          stream)
            return
        for grp in range(ngroups):
            c0 = grp * gsize
            c1 = group_end(grp, gsize, d.C)
            forward_group(x, d, k, P, c0, c1, mom, part, cur, scale, shift, stream)
        return
    if nch > ngroups:
        nch = ngroups
    team_begin(&T, nthreads)
    if chain:       # chains of consecutive groups as the items
        for grp in prange(nch, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            forward_chain(x, d, k, P, gsize, grp * ngroups // nch,
                          (grp + 1) * ngroups // nch,
                          mom, part, cur, scale, shift, stream)
            team_add(&T, threadid(), t_item)
    else:
        for grp in prange(ngroups, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            c0 = grp * gsize
            c1 = group_end(grp, gsize, d.C)
            forward_group(x, d, k, P, c0, c1, mom, part, cur, scale, shift, stream)
            team_add(&T, threadid(), t_item)
    team_end(&T)


cdef void backward_finish(const cbn_desc* d, const cbn_backward_args* k, Py_ssize_t c0,
                          Py_ssize_t c1, const Sums* sums, const floating* tag,
                          floating* k1, floating* k2) noexcept nogil:
    """stage_backward_finish for channels c0..c1 (tag: the dtype)."""
    stage_backward_finish(sums + c0, <floating*>k.save_invstd + c0, <double>d.M * d.K,
                          <floating*>shifted(<floating*>k.grad_weight, c0),
                          <floating*>shifted(<floating*>k.grad_bias, c0), k1 + c0, k2 + c0,
                          c1 - c0)


cdef void backward_group(const storage* x, const cbn_desc* d, const cbn_backward_args* k,
                         Planes P, Py_ssize_t c0,
                         Py_ssize_t c1, const floating* scale, Sums* sums, Sums* part,
                         Py_ssize_t* cur, floating* k1, floating* k2,
                         int stream) noexcept nogil:
    """Sums, finish and dx of channels c0..c1 (see backward_t's stages)."""
    cdef Py_ssize_t j
    cdef const storage* g = <storage*>k.grad_output
    cdef const floating* mean = <floating*>k.save_mean
    cdef Dact da = make_dact(&k.act, k.output, k.residual, k.bias)
    cdef Pass dx = bwd_pass(OP_BWD_TRAIN | stream, &k.act, x, g, k.output, k.residual,
                            k.grad_input, mean, scale, k.bias, k1, k2)
    sums_begin(c0, c1, sums, part, cur)
    for j in range(P.nmb):
        sums_step(g, x, &da, <storage*>k.grad_residual, P, j, c0, c1, mean, scale, sums,
                  part, cur)
    sums_end(c0, c1, sums, part)
    backward_finish(d, k, c0, c1, sums, k1, k1, k2)
    rows_of_group(&dx, 0, d.M, d.C, d.K, c0, c1, x)
    if stream:
        cbn_sfence()


cdef void blocked_backward(const storage* x, const cbn_desc* d, const cbn_backward_args* k,
                           Py_ssize_t gsize,
                           const floating* scale, Sums* sums, Sums* part, Py_ssize_t* cur,
                           floating* k1, floating* k2) noexcept nogil:
    """The training backward, groups of gsize channels as parallel work items."""
    cdef Planes P = planes_partition(d.M, d.C, d.K, BLOCK)
    cdef Py_ssize_t ngroups = (d.C + gsize - 1) // gsize, grp, c0, c1
    cdef int stream = stream_flag(d.M * d.C * d.K, sizeof(storage), True)
    cdef Team T
    cdef int64_t t_item
    cdef int nthreads = d.nthreads
    P.pf = prefetch_flag(d.M * d.C * d.K * (3 if k.output != NULL else 2), sizeof(storage),
                         True)
    if nthreads == 1:
        for grp in range(ngroups):
            c0 = grp * gsize
            c1 = group_end(grp, gsize, d.C)
            backward_group(x, d, k, P, c0, c1, scale, sums, part, cur, k1, k2, stream)
        return
    team_begin(&T, nthreads)
    for grp in prange(ngroups, num_threads=nthreads, schedule="dynamic"):
        t_item = cbn_now_ns()
        c0 = grp * gsize
        c1 = group_end(grp, gsize, d.C)
        backward_group(x, d, k, P, c0, c1, scale, sums, part, cur, k1, k2, stream)
        team_add(&T, threadid(), t_item)
    team_end(&T)


# --------------------------------------------------------------- settings (tests, bench)

def cache_info():
    """The last-level cache the channel-blocked passes size their groups for (see
    cbn/src/cbn_cache.h): its level (0: unknown), size in bytes, the number of CPUs
    sharing it, where that was read ("sysfs", "sysconf" or "default"), and the level-2
    cache's size in bytes (0: unknown), which caps a group."""
    return {"level": cbn_cache_level, "size": cbn_cache_size,
            "sharing": cbn_cache_sharing, "source": cbn_cache_source.decode(),
            "l2_size": cbn_l2_size}


def _blocking(mode=None, budget=None, stream=None, chain=None):
    """Set the channel-blocked passes' mode ("auto", "off" or "force": blocked wherever
    the layout allows, whatever the size) and the bytes of input per group (0: from the
    cache size) and whether the output pass stores non-temporally and whether forwards
    over long planes run as chains (see chained); None keeps a setting. Returns the previous
    (mode, budget, stream, chain). For tests and measurements; not thread-safe against
    calls running meanwhile."""
    global blocking_mode, blocking_budget, blocking_stream, chain_mode
    names = {"off": BLOCKING_OFF, "auto": BLOCKING_AUTO, "force": BLOCKING_FORCE}
    old = ({v: n for n, v in names.items()}[blocking_mode], blocking_budget,
           blocking_stream != 0, chain_mode != 0)
    if mode is not None:
        if mode not in names:
            raise ValueError(f"blocking mode must be one of {sorted(names)}, got {mode!r}")
        blocking_mode = names[mode]
    if budget is not None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        blocking_budget = budget
    if stream is not None:
        blocking_stream = OP_STREAM if stream else 0
    if chain is not None:
        chain_mode = 1 if chain else 0
    return old


def _block_channels(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, Py_ssize_t itemsize,
                    int narrays, int nthreads, bint forward=False):
    """Channels per group a training pass over narrays (M, C, K) arrays (forward: the
    training forward) would use now (0: the two-pass path)."""
    return block_channels(M, C, K, itemsize, narrays, nthreads, forward)


cbn_cache_probe()
