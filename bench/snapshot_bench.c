/*
 * snapshot_bench.c — how long a bucket-state snapshot holds a shard lock, and how long a
 * snapshot of N keys takes to write and to load.
 *
 *   build/snapshot_bench [keys]      (default 1,000,000; default 256 shards)
 *
 * Lock holds are timed around each sl_limiter_visit_slice call (the unit sl_snapshot_write
 * uses), copying the same bytes the snapshot copies; wall time, so a hold that was preempted
 * on a busy machine shows as a long one: read the mean and p99.9, not only the max.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "limiter_int.h"
#include "memory.h"
#include "sluice.h"

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static char g_buf[1 << 22];
static size_t g_len;

static int copy(void *ctx, const char *k, size_t kl, const sl_policy *p, const void *s, size_t ss)
{
    (void)ctx;
    if (g_len + kl + 33 * p->nlimits + ss + 8 > sizeof g_buf)
        g_len = 0;
    memcpy(g_buf + g_len, k, kl);
    memcpy(g_buf + g_len + kl, p->limits, 33 * p->nlimits);
    memcpy(g_buf + g_len + kl + 33 * p->nlimits, s, ss);
    g_len += kl + 33 * p->nlimits + ss + 7;
    return 0;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    long keys = argc > 1 ? atol(argv[1]) : 1000000;
    sl_limiter *l;
    if (sl_open(&l, NULL) != SL_OK)
        return 1;
    char id[32];
    for (long i = 0; i < keys; i++) {
        snprintf(id, sizeof id, "user:%ld", i);
        sl_key k = SL_KEY("bench", "api", id);
        sl_decision d;
        sl_take(l, &k, 1, SL_NOW, &d);
    }
    size_t cap = (size_t)keys / 16 + 1024, n = 0;
    double *holds = malloc(cap * sizeof *holds);
    unsigned shards = sl_limiter_nshards(l);
    for (unsigned i = 0; i < shards; i++) {
        sl_slice c;
        int st = SL_SLICE_MORE, rc;
        for (int first = 1; st == SL_SLICE_MORE; first = 0) {
            double t0 = now_ns();
            st = sl_limiter_visit_slice(l, i, &c, first, 32, copy, NULL, &rc);
            if (n < cap)
                holds[n++] = now_ns() - t0;
        }
    }
    qsort(holds, n, sizeof *holds, cmp);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += holds[i];
    char path[] = "/tmp/sluice-snapbench-XXXXXX";
    int fd = mkstemp(path);
    double t0 = now_ns();
    int rc = sl_snapshot_write(l, fd);
    double w = now_ns() - t0;
    close(fd);
    sl_limiter *b;
    sl_open(&b, NULL);
    t0 = now_ns();
    rc |= sl_snapshot_load(b, path);
    double r = now_ns() - t0;
    unlink(path);
    printf("RESULT name=snapshot_lock_hold metric=mean_ns value=%.0f\n", sum / n);
    printf("RESULT name=snapshot_lock_hold metric=p999_ns value=%.0f\n", holds[n * 999 / 1000]);
    printf("RESULT name=snapshot_lock_hold metric=max_ns value=%.0f\n", holds[n - 1]);
    printf("RESULT name=snapshot_write metric=ms value=%.1f\n", w / 1e6);
    printf("RESULT name=snapshot_load metric=ms value=%.1f\n", r / 1e6);
    printf("# %ld keys, %u shards, %zu lock holds of at most 32 keys\n", keys, shards, n);
    free(holds);
    sl_close(l);
    sl_close(b);
    return rc != SL_OK;
}
