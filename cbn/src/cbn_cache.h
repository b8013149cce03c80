/* cbn_cache.h: the size of the last-level cache, read once at import.
 *
 * The channel-blocked training passes (cbn/_blocked.pxi) reduce a group of channels and
 * then write its output while the group's values are still in cache, so a group must fit
 * the cache that is large enough to hold several channels: the last level (L3 on x86-64
 * servers; a channel of a 20 MB input is 0.2 to 6 MB, more than an L2 holds).
 *
 * Where it is read (first that answers):
 *   sysfs    Linux: /sys/devices/system/cpu/cpu0/cache/index<i>/{level,type,size,
 *            shared_cpu_list}: the highest level that holds data, its size and how many
 *            CPUs share one instance of it
 *   sysconf  _SC_LEVEL3_CACHE_SIZE, else _SC_LEVEL2_CACHE_SIZE (glibc); the number of
 *            CPUs sharing it is unknown there, so the size is capped at CBN_CACHE_CAP
 *            (glibc reports the sum over a whole package on some machines)
 *   default  CBN_CACHE_DEFAULT bytes, shared by one CPU
 * and the level-2 data cache's size (each core's own on x86-64), from the same places.
 *
 * For float32 and float64 data a group is sized for the level-2 cache when that is
 * smaller than its share of the last level, and the blocked passes count the last level
 * as 16 MB at most (cbn/_blocked.pxi): a core reads its own L2 several times faster than
 * a large server L3, which one core reads at about the speed of memory. Measured on a
 * 2-core VM whose L3 reads 480 MB (2026-12-05): groups sized for that L3 never blocked,
 * and a float32 training backward over 16x64x56x56 took 2.27 ms on one thread against
 * 1.60-1.67 ms with groups of 0.25-1 MB (4 MB: 2.26).
 */
#ifndef CBN_CACHE_H
#define CBN_CACHE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CBN_CACHE_DEFAULT (8LL << 20)
#define CBN_CACHE_CAP (32LL << 20)

static long long cbn_cache_size = 0;      /* bytes of one instance of the last level */
static int cbn_cache_level = 0;
static int cbn_cache_sharing = 1;         /* CPUs sharing that instance */
static const char* cbn_cache_source = "";
static long long cbn_l2_size = 0;         /* bytes of the level-2 data cache (0: unknown) */

/* The first line of a small text file, or 0 if it cannot be read. */
static int cbn_read_line(const char* path, char* buf, int n) {
    FILE* f = fopen(path, "r");
    int ok;
    if (f == NULL) return 0;
    ok = fgets(buf, n, f) != NULL;
    fclose(f);
    return ok;
}

/* "32768K", "1M", "1024": bytes, or 0. */
static long long cbn_parse_size(const char* s) {
    char* end;
    long long v = strtoll(s, &end, 10);
    if (end == s || v <= 0) return 0;
    if (*end == 'K' || *end == 'k') v <<= 10;
    else if (*end == 'M' || *end == 'm') v <<= 20;
    else if (*end == 'G' || *end == 'g') v <<= 30;
    return v;
}

/* The number of CPUs in a list such as "0-3,8-11" (at least 1). */
static int cbn_count_cpus(const char* s) {
    int n = 0;
    long a, b;
    char* end;
    while (*s) {
        a = strtol(s, &end, 10);
        if (end == s) break;
        b = a;
        s = end;
        if (*s == '-') {
            b = strtol(s + 1, &end, 10);
            if (end == s + 1) break;
            s = end;
        }
        if (b >= a) n += (int)(b - a + 1);
        if (*s == ',') s++;
        else break;
    }
    return n > 0 ? n : 1;
}

static void cbn_cache_probe(void) {
    char path[128], buf[256];
    int i, level, best = 0, sharing = 1;
    long long size, best_size = 0;
    for (i = 0; i < 16; i++) {
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/level", i);
        if (!cbn_read_line(path, buf, sizeof(buf))) break;
        level = atoi(buf);
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/type", i);
        if (cbn_read_line(path, buf, sizeof(buf)) && strncmp(buf, "Instruction", 11) == 0)
            continue;
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        if (!cbn_read_line(path, buf, sizeof(buf))) continue;
        size = cbn_parse_size(buf);
        if (size > 0 && level == 2) cbn_l2_size = size;
        if (size <= 0 || level < best) continue;
        best = level;
        best_size = size;
        sharing = 1;
        snprintf(path, sizeof(path),
                 "/sys/devices/system/cpu/cpu0/cache/index%d/shared_cpu_list", i);
        if (cbn_read_line(path, buf, sizeof(buf))) sharing = cbn_count_cpus(buf);
    }
    if (best > 0) {
        cbn_cache_size = best_size;
        cbn_cache_level = best;
        cbn_cache_sharing = sharing;
        cbn_cache_source = "sysfs";
        return;
    }
    size = 0;
    level = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    if (sysconf(_SC_LEVEL2_CACHE_SIZE) > 0) cbn_l2_size = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
#if defined(_SC_LEVEL3_CACHE_SIZE)
    size = sysconf(_SC_LEVEL3_CACHE_SIZE);
    level = 3;
#endif
#if defined(_SC_LEVEL2_CACHE_SIZE)
    if (size <= 0) {
        size = sysconf(_SC_LEVEL2_CACHE_SIZE);
        level = 2;
    }
#endif
    if (size > 0) {
        cbn_cache_size = size < CBN_CACHE_CAP ? size : CBN_CACHE_CAP;
        cbn_cache_level = level;
        cbn_cache_sharing = 1;
        cbn_cache_source = "sysconf";
        return;
    }
    cbn_cache_size = CBN_CACHE_DEFAULT;
    cbn_cache_level = 0;
    cbn_cache_sharing = 1;
    cbn_cache_source = "default";
}

#endif /* CBN_CACHE_H */
