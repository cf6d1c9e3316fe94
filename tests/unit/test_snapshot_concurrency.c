/*
 * test_snapshot_concurrency.c — snapshots written while other threads decide (and insert
 * new keys): no data race (ThreadSanitizer), every snapshot loads, and the keys it holds are
 * keys that existed.
 */
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "sluice.h"

static sl_limiter *g_lim;
static _Atomic int g_stop;
static pthread_barrier_t g_start;

static void *decider(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    char id[32];
    pthread_barrier_wait(&g_start);
    for (int i = 0; !g_stop && i < 2000000; i++) {
        seed = seed * 1103515245u + 12345u;
        snprintf(id, sizeof id, "c%u", (seed >> 8) % 20000);
        sl_key k = SL_KEY("t", "a", id);
        sl_decision d;
        assert_int_equal(sl_take(g_lim, &k, 1, SL_NOW, &d), SL_OK);
    }
    return NULL;
}

static void test_save_while_deciding(void **st)
{
    (void)st;
    assert_int_equal(sl_open(&g_lim, NULL), SL_OK);
    char path[] = "/tmp/sluice-snapc-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    pthread_t t[2];
    pthread_barrier_init(&g_start, NULL, 3);
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, decider, (void *)(uintptr_t)(i + 1));
    pthread_barrier_wait(&g_start);
    sl_stats s0 = {0};
    for (int spin = 0; spin < 10000000 && s0.keys < 100; spin++) { /* deciders under way */
        sched_yield();
        sl_stats_get(g_lim, NULL, 0, &s0);
    }
    for (int round = 0; round < 8; round++) {
        assert_int_equal(sl_snapshot_save(g_lim, path), SL_OK);
        sl_limiter *b;
        assert_int_equal(sl_open(&b, NULL), SL_OK);
        assert_int_equal(sl_snapshot_load(b, path), SL_OK);
        sl_stats s;
        sl_stats_get(b, NULL, 0, &s);
        assert_true(s.keys <= 20000);
        assert_true(s.keys > 0);
        sl_close(b);
    }
    g_stop = 1;
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&g_start);
    unlink(path);
    sl_close(g_lim);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_save_while_deciding)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
