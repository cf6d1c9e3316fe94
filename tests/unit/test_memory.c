/* test_memory.c — memory bounds through the public API: bytes per key at one million
 * token-bucket keys, and a flood of ten million distinct ids against max_keys. */
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmocka.h>

#include "sluice.h"

#define T0 (1000 * SL_SECOND)

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

static size_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long size = 0, res = 0;
    assert_non_null(f);
    assert_int_equal(fscanf(f, "%lu %lu", &size, &res), 2);
    fclose(f);
    return res * (size_t)sysconf(_SC_PAGESIZE);
}

static void test_one_million_keys_bytes_per_key(void **st)
{
    (void)st;
    enum { N = 1000000 };
    size_t before = rss_bytes();
    sl_limiter *l;
    assert_int_equal(sl_open(&l, NULL), SL_OK);
    char c[32];
    for (int i = 0; i < N; i++) {
        int n = snprintf(c, sizeof c, "user:%07d", i); /* 14-byte keys */
        sl_key k = {NULL, 0, NULL, 0, c, (size_t)n};
        sl_decision d;
        assert_int_equal(sl_take(l, &k, 1, T0, &d), SL_OK);
        if (!d.allowed)
            fail_msg("key %d denied on first use", i);
    }
    sl_stats s;
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    assert_int_equal(s.keys, N);
    double per_key = (double)(rss_bytes() - before) / N;
    printf("RESULT name=memory_1m_token_bucket metric=bytes_per_key value=%.1f\n", per_key);
#ifndef UNDER_ASAN
    assert_true(per_key <= 64.0);
#endif
    /* every key still holds its state */
    for (int i = 0; i < N; i += 9973) {
        int n = snprintf(c, sizeof c, "user:%07d", i);
        sl_key k = {NULL, 0, NULL, 0, c, (size_t)n};
        sl_decision d;
        assert_int_equal(sl_peek(l, &k, T0, &d), SL_OK);
        assert_int_equal(d.remaining, 3);
    }
    sl_close(l);
}

static void test_ten_million_ids_flood_stays_within_max_keys(void **st)
{
    (void)st;
    enum { N = 10000000, MAX = 100000 };
    sl_limiter *l;
    sl_options o;
    sl_options_init(&o);
    o.max_keys = MAX;
    assert_int_equal(sl_open(&l, &o), SL_OK);
    char c[32];
    sl_stats s;
    for (int i = 0; i < N; i++) {
        int n = snprintf(c, sizeof c, "flood-%d", i);
        sl_key k = {"evil", 4, NULL, 0, c, (size_t)n};
        sl_decision d;
        assert_int_equal(sl_take(l, &k, 1, T0, &d), SL_OK);
        if (i % 1000000 == 999999) {
            assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
            if (s.keys > MAX)
                fail_msg("%llu keys held, max_keys %d", (unsigned long long)s.keys, MAX);
        }
    }
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    assert_true(s.keys <= MAX);
    assert_true(s.keys >= MAX / 2); /* the bound is used, not just respected */
    assert_int_equal(s.evicted + s.keys, N);
    uint64_t evicted = s.evicted;
    assert_int_equal(sl_stats_get(l, "evil", 4, &s), SL_OK); /* counted for the tenant */
    assert_int_equal(s.evicted, evicted);
    assert_int_equal(s.allowed, N);
    sl_close(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_million_keys_bytes_per_key),
        cmocka_unit_test(test_ten_million_ids_flood_stays_within_max_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
