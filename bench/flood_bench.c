/*
 * flood_bench.c — what a flood of new client ids costs when max_keys is reached: every
 * request is a key never seen before, so every decision inserts a key and evicts one (the
 * attack that max_keys exists for: a public API hit with random ids).
 *
 *   build/flood_bench [--max-keys N] [--keys N] [--reps R]
 *
 * Opens a limiter with max_keys N (default 100,000) and the default policy, fills it with N
 * keys, then times --keys (default 2,000,000) more, all distinct, in one thread (the ids are
 * made before the clock starts). The median of --reps (default 5) runs is printed:
 *     RESULT name=flood_new_keys metric=ns_per_decision value=<ns>
 *     RESULT name=flood_new_keys metric=decisions_per_s value=<n>
 * and, as the reference in the same run, the same number of decisions on keys already held
 * (the newest max/2 ids of the flood again, in the same order: hits; `evicted` counts the
 * evictions meanwhile, which should be 0):
 *     RESULT name=flood_known_keys metric=ns_per_decision value=<ns>
 *     RESULT name=flood_known_keys metric=evicted value=<n>
 *     RESULT name=flood_new_vs_known metric=ratio value=<new / known>
 * Compare two builds with the ratio, or by running both binaries alternately.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sluice.h"

#define MAX_REPS 15
#define ID_LEN 16 /* "f" + 15 digits, zero-padded */

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void die(const char *msg)
{
    fprintf(stderr, "flood_bench: %s\n", msg);
    exit(1);
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Decide every id of ids[0..n) once; ns per decision. */
static double run(sl_limiter *l, const char *ids, size_t n)
{
    double t0 = now_ns();
    for (size_t i = 0; i < n; i++) {
        sl_key k = {"flood", 5, "a", 1, ids + i * ID_LEN, ID_LEN};
        sl_decision d;
        if (sl_take(l, &k, 1, SL_NOW, &d) != SL_OK)
            die("sl_take failed");
    }
    return (now_ns() - t0) / (double)n;
}

static uint64_t evicted(sl_limiter *l)
{
    sl_stats s;
    if (sl_stats_get(l, NULL, 0, &s) != SL_OK)
        die("sl_stats_get failed");
    return s.evicted;
}

int main(int argc, char **argv)
{
    size_t max = 100000, n = 2000000;
    int reps = 5;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--max-keys") == 0)
            max = strtoul(argv[++i], NULL, 10);
        else if (i + 1 < argc && strcmp(argv[i], "--keys") == 0)
            n = strtoul(argv[++i], NULL, 10);
        else if (i + 1 < argc && strcmp(argv[i], "--reps") == 0)
            reps = atoi(argv[++i]);
        else
            die("usage: flood_bench [--max-keys N] [--keys N] [--reps R]");
    }
    if (max < 1 || n < max || reps < 1 || reps > MAX_REPS || n > 1000000000 ||
        max > 1000000000)
        die("parameters out of range (--keys at least --max-keys, both at most 10^9; "
            "--reps 1..15)");

    /* ids for every rep: the fill, then n new ones per rep (each rep floods afresh) */
    size_t total = max + n * (size_t)reps;
    char *ids = malloc(total * ID_LEN);
    if (!ids)
        die("out of memory");
    for (size_t i = 0; i < total; i++) {
        char b[32];
        snprintf(b, sizeof b, "f%015zu", i); /* total < 10^15: exactly ID_LEN bytes */
        memcpy(ids + i * ID_LEN, b, ID_LEN);
    }
    sl_options o;
    sl_options_init(&o);
    o.max_keys = max;
    sl_limiter *l;
    if (sl_open(&l, &o) != SL_OK)
        die("sl_open failed");
    run(l, ids, max);

    double fresh[MAX_REPS], known[MAX_REPS];
    uint64_t missed = 0;
    for (int r = 0; r < reps; r++) {
        const char *batch = ids + (max + n * (size_t)r) * ID_LEN;
        fresh[r] = run(l, batch, n);
        /* the newest half of the bound are held now (CLOCK evicts among older ones, and a
         * key takes a second to be full, hence reclaimable): decide them again, n in all */
        const char *held = batch + (n - max / 2) * ID_LEN;
        size_t m = max / 2 ? max / 2 : 1, done = 0;
        uint64_t ev0 = evicted(l);
        double t = 0;
        for (; done < n; done += m)
            t += run(l, held, m) * (double)m;
        known[r] = t / (double)done;
        missed += evicted(l) - ev0;
    }
    sl_stats s;
    if (sl_stats_get(l, NULL, 0, &s) != SL_OK || s.keys > max)
        die("max_keys not honoured");
    qsort(fresh, (size_t)reps, sizeof *fresh, cmp);
    qsort(known, (size_t)reps, sizeof *known, cmp);
    double f = fresh[reps / 2], k = known[reps / 2];
    printf("# flood_bench libsluice %s: max_keys %zu, %zu new keys per rep, %d reps, %llu "
           "evicted\n", sl_version_string(), max, n, reps, (unsigned long long)s.evicted);
    printf("RESULT name=flood_new_keys metric=ns_per_decision value=%.1f\n", f);
    printf("RESULT name=flood_new_keys metric=decisions_per_s value=%.0f\n", 1e9 / f);
    printf("RESULT name=flood_known_keys metric=ns_per_decision value=%.1f\n", k);
    printf("RESULT name=flood_known_keys metric=evicted value=%llu\n", (unsigned long long)missed);
    printf("RESULT name=flood_new_vs_known metric=ratio value=%.2f\n", f / k);
    sl_close(l);
    free(ids);
    return 0;
}
