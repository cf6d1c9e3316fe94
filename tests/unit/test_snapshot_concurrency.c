/*
 * test_snapshot_concurrency.c — snapshots written while other threads decide, insert, evict
 * and sweep: no data race (ThreadSanitizer), every snapshot loads, and none misses a key.
 */
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "sluice.h"

#define NKEYS 20000

static sl_limiter *g_lim;
static _Atomic int g_stop;
static pthread_barrier_t g_start;
static char g_path[] = "/tmp/sluice-snapc-XXXXXX";

static void *decider(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    char id[32];
    pthread_barrier_wait(&g_start);
    for (int i = 0; !g_stop && i < 2000000; i++) {
        seed = seed * 1103515245u + 12345u;
        snprintf(id, sizeof id, "c%u", (seed >> 8) % NKEYS);
        sl_key k = SL_KEY("t", "a", id);
        sl_decision d;
        assert_int_equal(sl_take(g_lim, &k, 1, SL_NOW, &d), SL_OK);
    }
    return NULL;
}

static void *sweeper(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&g_start);
    while (!g_stop) {
        sl_sweep(g_lim, SL_NOW, 64);
        sched_yield();
    }
    return NULL;
}

static uint64_t keys_of(sl_limiter *l)
{
    sl_stats s;
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    return s.keys;
}

static void wait_for_keys(uint64_t n)
{
    for (int spin = 0; spin < 10000000 && keys_of(g_lim) < n; spin++)
        sched_yield();
}

static void start(int ndeciders, int sweep, pthread_t *t)
{
    g_stop = 0;
    pthread_barrier_init(&g_start, NULL, (unsigned)(ndeciders + sweep + 1));
    for (int i = 0; i < ndeciders; i++)
        pthread_create(&t[i], NULL, decider, (void *)(uintptr_t)(i + 1));
    if (sweep)
        pthread_create(&t[ndeciders], NULL, sweeper, NULL);
    pthread_barrier_wait(&g_start);
}

static void stop(int n, pthread_t *t)
{
    g_stop = 1;
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&g_start);
}

/* Keys are only added (a slow default policy: none is ever full again, so none is
 * reclaimed; no max_keys): a snapshot then holds every key that existed when it began and no
 * key that did not exist when it ended. */
static void test_save_while_inserting_misses_nothing(void **st)
{
    (void)st;
    sl_policy slow = SL_POLICY_TOKEN_BUCKET(1000, 0.0001);
    sl_options o;
    sl_options_init(&o);
    o.default_policy = &slow;
    assert_int_equal(sl_open(&g_lim, &o), SL_OK);
    pthread_t t[2];
    start(2, 0, t);
    wait_for_keys(100);
    for (int round = 0; round < 8; round++) {
        uint64_t before = keys_of(g_lim);
        assert_int_equal(sl_snapshot_save(g_lim, g_path), SL_OK);
        uint64_t after = keys_of(g_lim);
        sl_snapshot_info w, r;
        assert_int_equal(sl_snapshot_last(g_lim, SL_SNAPSHOT_WRITE, &w), SL_OK);
        sl_limiter *b;
        assert_int_equal(sl_open(&b, NULL), SL_OK);
        assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
        assert_int_equal(sl_snapshot_last(b, SL_SNAPSHOT_READ, &r), SL_OK);
        uint64_t loaded = keys_of(b);
        assert_true(loaded >= before);
        assert_true(loaded <= after);
        /* Every record written is restored. A key is written twice only when its shard got
         * a bigger block between two slices (the cursor is re-mapped and a few homes are
         * visited again; the later copy wins on load): a few per growth, never a shard
         * twice over. */
        assert_int_equal(r.keys, w.keys);
        assert_true(w.keys >= loaded);
        assert_true(w.keys - loaded <= loaded / 16);
        sl_close(b);
    }
    stop(2, t);
    sl_close(g_lim);
}

static void *saver(void *arg)
{
    (void)arg;
    for (int round = 0; round < 6; round++) {
        assert_int_equal(sl_snapshot_save(g_lim, g_path), SL_OK);
        sl_limiter *b;
        assert_int_equal(sl_open(&b, NULL), SL_OK);
        assert_int_equal(sl_snapshot_load(b, g_path), SL_OK); /* this save's or the other's */
        uint64_t n = keys_of(b);
        assert_true(n > 0 && n <= NKEYS);
        sl_close(b);
    }
    return NULL;
}

/* Churn: a bounded limiter evicting on most inserts, reclaiming idle keys, a sweeper, and two
 * threads saving to the same path at once (each save has its own temp file). */
static void test_save_under_churn(void **st)
{
    (void)st;
    sl_options o;
    sl_options_init(&o);
    o.shards = 16;
    o.max_keys = 3000;
    assert_int_equal(sl_open(&g_lim, &o), SL_OK);
    pthread_t t[3], s[2];
    start(2, 1, t);
    wait_for_keys(1000);
    for (int i = 0; i < 2; i++)
        pthread_create(&s[i], NULL, saver, NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(s[i], NULL);
    stop(3, t);
    sl_stats st2;
    sl_stats_get(g_lim, NULL, 0, &st2);
    assert_true(st2.keys <= 3000);
    sl_close(g_lim);
}

static int setup(void **st)
{
    (void)st;
    int fd = mkstemp(g_path);
    assert_true(fd >= 0);
    close(fd);
    return 0;
}

static int teardown(void **st)
{
    (void)st;
    unlink(g_path);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_save_while_inserting_misses_nothing),
        cmocka_unit_test(test_save_under_churn),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
