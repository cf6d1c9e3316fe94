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
 * Then churn with mostly-referenced keys, on a second limiter filled the same way: half of
 * the bound (the oldest ids) is hot, decided in a shuffled order, and every --mix (default
 * 4) hot decisions are followed by one new id (which evicts). The CLOCK hand must pass over
 * hot keys to find a cold one. Each hot key is decided once before the clock starts;
 * `hot_reinserted` counts hot keys inserted again after that (evicted meanwhile: the policy
 * here refills too slowly for any key to be reclaimed as idle and full):
 *     RESULT name=churn_mixed metric=ns_per_decision value=<ns>
 *     RESULT name=churn_mixed metric=hot_reinserted value=<n>
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

static void take(sl_limiter *l, const char *id)
{
    sl_key k = {"flood", 5, "a", 1, id, ID_LEN};
    sl_decision d;
    if (sl_take(l, &k, 1, SL_NOW, &d) != SL_OK)
        die("sl_take failed");
}

/* Decide every id of ids[0..n) once; ns per decision. */
static double run(sl_limiter *l, const char *ids, size_t n)
{
    double t0 = now_ns();
    for (size_t i = 0; i < n; i++)
        take(l, ids + i * ID_LEN);
    return (now_ns() - t0) / (double)n;
}

/* n decisions: `mix` on hot ids (in the order of `order`, cycling), then one new id from
 * `fresh`, and so on; ns per decision. *next_hot carries the place in `order` over. */
static double churn(sl_limiter *l, const char *hot, const uint32_t *order, size_t nhot,
                    size_t *next_hot, const char *fresh, size_t n, int mix)
{
    double t0 = now_ns();
    size_t h = *next_hot, f = 0;
    for (size_t i = 0; i < n; i++) {
        if (i % (size_t)(mix + 1) == (size_t)mix) {
            take(l, fresh + f++ * ID_LEN);
        } else {
            take(l, hot + (size_t)order[h] * ID_LEN);
            h = h + 1 == nhot ? 0 : h + 1;
        }
    }
    *next_hot = h;
    return (now_ns() - t0) / (double)n;
}

static sl_stats stats(sl_limiter *l)
{
    sl_stats s;
    if (sl_stats_get(l, NULL, 0, &s) != SL_OK)
        die("sl_stats_get failed");
    return s;
}


int main(int argc, char **argv)
{
    size_t max = 100000, n = 2000000;
    int reps = 5, mix = 4;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--max-keys") == 0)
            max = strtoul(argv[++i], NULL, 10);
        else if (i + 1 < argc && strcmp(argv[i], "--keys") == 0)
            n = strtoul(argv[++i], NULL, 10);
        else if (i + 1 < argc && strcmp(argv[i], "--reps") == 0)
            reps = atoi(argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--mix") == 0)
            mix = atoi(argv[++i]);
        else
            die("usage: flood_bench [--max-keys N] [--keys N] [--reps R] [--mix M]");
    }
    if (max < 2 || n < max || reps < 1 || reps > MAX_REPS || n > 1000000000 ||
        max > 1000000000 || mix < 1 || mix > 1000)
        die("parameters out of range (--keys at least --max-keys, both 2..10^9; "
            "--reps 1..15; --mix 1..1000)");

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
        uint64_t ev0 = stats(l).evicted;
        double t = 0;
        for (; done < n; done += m)
            t += run(l, held, m) * (double)m;
        known[r] = t / (double)done;
        missed += stats(l).evicted - ev0;
    }
    sl_stats s = stats(l);
    if (s.keys > max)
        die("max_keys not honoured");
    sl_close(l);

    /* churn: hot = the oldest max/2 ids, in a shuffled order; new ids from the flood's
     * (new to this limiter) */
    size_t nhot = max / 2, next_hot = 0, per = n / (size_t)(mix + 1);
    uint32_t *order = malloc(nhot * sizeof *order);
    if (!order)
        die("out of memory");
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < nhot; i++)
        order[i] = (uint32_t)i;
    for (size_t i = nhot - 1; i > 0; i--) { /* Fisher-Yates, xorshift64 */
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t j = (size_t)(x % (i + 1));
        uint32_t t = order[i];
        order[i] = order[j], order[j] = t;
    }
    /* a token takes 1000 s to come back: no key becomes idle and full (reclaimable) during
     * the run, so every hot key inserted again was evicted */
    sl_policy slow = SL_POLICY_TOKEN_BUCKET(1000, 0.001);
    o.default_policy = &slow;
    if (sl_open(&l, &o) != SL_OK)
        die("sl_open failed");
    run(l, ids, max);
    for (size_t i = 0; i < nhot; i++) /* every hot key referenced once, then the clock runs */
        take(l, ids + (size_t)order[i] * ID_LEN);
    double mixed[MAX_REPS];
    sl_stats s0 = stats(l);
    uint64_t fresh_taken = 0;
    for (int r = 0; r < reps; r++) {
        size_t m = (size_t)mix + 1;
        mixed[r] = churn(l, ids, order, nhot, &next_hot, ids + (max + per * (size_t)r) * ID_LEN,
                         n, mix);
        fresh_taken += n / m + (n % m > (size_t)mix);
    }
    /* keys inserted = removed + the change in keys held; all but the new ids are hot */
    sl_stats s1 = stats(l);
    uint64_t again = s1.evicted - s0.evicted + s1.reclaimed - s0.reclaimed + s1.keys - s0.keys -
                     fresh_taken;
    free(order);
    qsort(mixed, (size_t)reps, sizeof *mixed, cmp);
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
    printf("RESULT name=churn_mixed metric=ns_per_decision value=%.1f\n", mixed[reps / 2]);
    printf("RESULT name=churn_mixed metric=hot_reinserted value=%llu\n",
           (unsigned long long)again);
    sl_close(l);
    free(ids);
    return 0;
}
