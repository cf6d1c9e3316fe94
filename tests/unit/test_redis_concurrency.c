/* test_redis_concurrency.c — one limiter on the Redis store shared by many threads (the
 * blocking transport's connection pools, node table, near cache and counters), and a second
 * limiter on the same Redis at the same time, as a second process would be: per key the
 * total admitted is exactly the capacity (never more; none lost). Run under ThreadSanitizer
 * by `make test SANITIZE=thread`. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cmocka.h>

#include "redis_fixture.h"
#include "sluice.h"

#define THREADS 8
#define KEYS 10
#define CAP 50
#define ROUNDS 40 /* per thread: ROUNDS batches of KEYS requests, or KEYS single takes */

static redis_fixture g_redis;
static sl_limiter *g_lim[2];
static _Atomic int g_admitted[KEYS];
static char g_names[KEYS][8];

static void *worker(void *p)
{
    int id = (int)(intptr_t)p;
    sl_limiter *l = g_lim[id % 2];
    for (int r = 0; r < ROUNDS; r++) {
        sl_request rq[KEYS];
        sl_decision d[KEYS];
        for (int k = 0; k < KEYS; k++)
            rq[k] = (sl_request){.key = SL_KEY("t", "a", g_names[(k + id) % KEYS]), .cost = 1};
        if (id % 3 == 0) { /* some threads batch, the others take one at a time */
            if (sl_take_batch(l, rq, KEYS, SL_NOW, d) != SL_OK)
                return (void *)1;
        } else {
            for (int k = 0; k < KEYS; k++)
                if (sl_take(l, &rq[k].key, 1, SL_NOW, &d[k]) != SL_OK)
                    return (void *)1;
        }
        for (int k = 0; k < KEYS; k++) {
            if (d[k].err != SL_OK || d[k].source == SL_SOURCE_FAIL_CLOSED)
                return (void *)1;
            if (d[k].allowed)
                atomic_fetch_add(&g_admitted[(k + id) % KEYS], 1);
        }
    }
    return NULL;
}

static void test_threads_and_two_limiters_share_exact_limits(void **st)
{
    (void)st;
    assert_int_equal(redis_fixture_start(&g_redis, NULL), 0);
    sl_policy p = SL_POLICY_TOKEN_BUCKET(CAP, 1.0 / 3600);
    for (int i = 0; i < 2; i++) {
        sl_redis_options ro;
        sl_redis_options_init(&ro);
        ro.servers = g_redis.addr;
        sl_options o;
        sl_options_init(&o);
        o.redis = &ro;
        o.default_policy = &p;
        assert_int_equal(sl_open(&g_lim[i], &o), SL_OK);
    }
    for (int k = 0; k < KEYS; k++)
        snprintf(g_names[k], sizeof g_names[k], "k%d", k);
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i), 0);
    int bad = 0;
    for (int i = 0; i < THREADS; i++) {
        void *rc;
        pthread_join(th[i], &rc);
        bad += rc != NULL;
    }
    assert_int_equal(bad, 0);
    for (int k = 0; k < KEYS; k++) /* 8 x 40 = 320 requests per key: 50 admitted */
        assert_int_equal(atomic_load(&g_admitted[k]), CAP);
    sl_store_stats s0, s1;
    sl_store_stats_get(g_lim[0], &s0);
    sl_store_stats_get(g_lim[1], &s1);
    assert_int_equal(s0.fail_closed + s1.fail_closed, 0);
    assert_true(s0.near_cache + s1.near_cache > 0);
    sl_close(g_lim[0]);
    sl_close(g_lim[1]);
    redis_fixture_stop(&g_redis);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads_and_two_limiters_share_exact_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
